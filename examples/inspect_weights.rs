//! Prints what a weights file holds: the architecture, every tensor's name, shape and
//! min/max/mean, and the metadata.
//!
//! ```sh
//! cargo run --example inspect_weights -- target/train_bottleneck/bottleneck.pw
//! ```
//! A damaged or foreign file gives a one-line reason and exit code 1; a usage error, code 2.

use pointwise::checkpoint::{self, LoadOptions};
use std::path::Path;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [path] = args.as_slice() else {
        eprintln!("usage: cargo run --example inspect_weights -- <weights file>");
        return ExitCode::from(2);
    };
    match checkpoint::load(Path::new(path), LoadOptions::default()) {
        Ok(checkpoint) => {
            println!("{path}");
            print!("{}", checkpoint.describe());
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("{path}: {error}");
            ExitCode::FAILURE
        }
    }
}
