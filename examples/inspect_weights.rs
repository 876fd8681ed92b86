//! Prints what a weights file holds: its graph node by node, every tensor's name, shape and
//! min/max/mean, where a training run stood (for a training checkpoint), and the metadata.
//! Files of format 1 (the bottleneck alone) are read too.
//!
//! ```sh
//! cargo run --example inspect_weights -- target/train_bottleneck/bottleneck.pw
//! ```
//! A damaged or foreign file gives a one-line reason and exit code 1; a usage error, code 2.

use pointwise::checkpoint::{self, LoadOptions};
use std::path::Path;
use std::process::ExitCode;

fn main() -> ExitCode {
    // args_os: a path need not be UTF-8.
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    let [path] = args.as_slice() else {
        eprintln!("usage: cargo run --example inspect_weights -- <weights file>");
        return ExitCode::from(2);
    };
    let path = Path::new(path);
    match checkpoint::load(path, LoadOptions::default()) {
        Ok(checkpoint) => {
            println!("{}", path.display());
            print!("{}", checkpoint.describe());
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("{}: {error}", path.display());
            ExitCode::FAILURE
        }
    }
}
