//! `site-manager`: the operator command (a thin main over
//! `site_manager::cli`).

fn main() -> std::process::ExitCode {
    site_manager::cli::main()
}
