fn main() -> std::process::ExitCode {
    tune_allocator();
    restore_sigpipe();
    ckptvc::cli::main()
}

/// `ckptvc log | head` should end quietly when `head` exits, as Unix tools
/// do; Rust ignores SIGPIPE by default, which turns it into a panic.
fn restore_sigpipe() {
    #[cfg(unix)]
    // SAFETY: resets one signal disposition before any other thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// Commit and checkout allocate and free buffers of a few MiB per chunk on
/// every worker thread. glibc serves those with fresh mmaps by default, so
/// every chunk paid page faults and page zeroing (a third of a lossy
/// commit's CPU time). Keeping them on the heap lets freed buffers be reused.
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator thresholds; called before any
    // other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 64 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
    }
}
