//! Prints the generated C header (`host-driver/include/hyp_abi.h`) to stdout,
//! or writes it to the path given as the only argument.
//!
//! `cargo run -p hypercalls --features alloc --example gen-header -- host-driver/include/hyp_abi.h`
//! (`cargo xtask gen-header` does the same).

use std::process::ExitCode;

fn main() -> ExitCode {
    let header = hypercalls::c_header();
    match std::env::args_os().nth(1) {
        None => {
            print!("{header}");
            ExitCode::SUCCESS
        }
        Some(path) => match std::fs::write(&path, header) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("gen-header: cannot write {}: {e}", path.to_string_lossy());
                ExitCode::FAILURE
            }
        },
    }
}
