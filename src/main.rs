//! The `granary` binary: parse, run, print errors on one line.

fn main() -> std::process::ExitCode {
    granary::cli::main()
}
