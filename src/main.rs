fn main() -> std::process::ExitCode {
    tune_allocator();
    ckptvc::cli::main()
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
