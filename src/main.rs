fn main() -> std::process::ExitCode {
    ckptvc::cli::main()
}
