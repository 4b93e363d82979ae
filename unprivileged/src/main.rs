//! The `warren` binary: a thin shell around [`warren::cli`].

fn main() -> std::process::ExitCode {
    warren::cli::main()
}
