fn main() -> std::process::ExitCode {
    coatcheck::cli::main()
}
