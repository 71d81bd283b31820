//! Prints the generated C header (`host-driver/include/s2pin_uapi.h`) to
//! stdout, or writes it to the path given as the only argument.
//!
//! `cargo run -p s2pin-uapi --features alloc --example gen-uapi-header -- host-driver/include/s2pin_uapi.h`
//! (`cargo xtask gen-header` does the same).

use std::process::ExitCode;

fn main() -> ExitCode {
    let header = s2pin_uapi::c_header();
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
