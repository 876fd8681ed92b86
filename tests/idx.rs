//! The IDX reader on the committed MNIST digits, and its fault battery: a file is untrusted.

use pointwise::idx::{class_counts, read_digits, read_images, read_labels};
use std::io::Write;
use std::path::{Path, PathBuf};

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("data/mnist-10k")
        .join(name)
}

fn scratch(test: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("idx")
        .join(test);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn gunzip(path: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    std::io::Read::read_to_end(
        &mut flate2::read::GzDecoder::new(std::fs::File::open(path).unwrap()),
        &mut out,
    )
    .unwrap();
    out
}

/// The README's class counts and shapes, read from the gzip files and from the same bytes
/// uncompressed.
#[test]
fn the_committed_digits_read_with_their_documented_counts() {
    let digits = read_digits(
        &data("mnist-10k-images-idx3-ubyte.gz"),
        &data("mnist-10k-labels-idx1-ubyte.gz"),
        10,
    )
    .unwrap();
    assert_eq!(digits.images.shape(), &[10_000, 1, 28, 28]);
    assert!(digits.images.iter().all(|&p| (0.0..=255.0).contains(&p)));
    let labels = ndarray::Array1::from(digits.labels.clone());
    assert_eq!(
        class_counts(labels.view(), 10),
        [1001, 1127, 991, 1032, 980, 863, 1014, 1070, 944, 978]
    );
    let dir = scratch("plain");
    let plain = dir.join("labels-idx1-ubyte");
    std::fs::write(&plain, gunzip(&data("mnist-10k-labels-idx1-ubyte.gz"))).unwrap();
    assert_eq!(read_labels(&plain, 10).unwrap(), digits.labels);
}

/// Every way a label file can be wrong is a typed, one-line error, never a panic: truncation
/// at every offset, every header byte flipped, a count that disagrees with the length, a
/// label outside the classes, a claimed size over the limit, a file of images and labels of
/// different counts, a directory, a missing file.
#[test]
fn damaged_idx_files_are_errors() {
    let dir = scratch("faults");
    let labels = gunzip(&data("mnist-10k-labels-idx1-ubyte.gz"));
    let path = dir.join("labels");
    let check = |bytes: &[u8], case: &str| {
        std::fs::write(&path, bytes).unwrap();
        let error = read_labels(&path, 10).expect_err(case);
        assert!(!error.to_string().contains('\n'), "{case}: {error}");
    };
    for cut in 0..labels.len() {
        if cut % 97 == 0 || cut < 16 {
            check(&labels[..cut], &format!("truncated at {cut}"));
        }
    }
    for byte in 0..8 {
        let mut flipped = labels.clone();
        flipped[byte] ^= 0x5a;
        check(&flipped, &format!("header byte {byte} flipped"));
    }
    let mut too_many = labels.clone();
    too_many[4..8].copy_from_slice(&10_001u32.to_be_bytes());
    check(&too_many, "count one too large");
    let mut huge = labels.clone();
    huge[4..8].copy_from_slice(&u32::MAX.to_be_bytes());
    check(&huge, "a count over the limit");
    let mut out_of_range = labels.clone();
    out_of_range[8 + 17] = 10;
    check(&out_of_range, "label 10 of 10 classes");
    let mut extra = labels.clone();
    extra.push(0);
    check(&extra, "one byte too many");
    // A gzip stream cut short.
    let gz = std::fs::read(data("mnist-10k-labels-idx1-ubyte.gz")).unwrap();
    check(&gz[..gz.len() / 2], "gzip cut in half");
    // Images and labels that disagree on the count.
    let short = dir.join("short-labels");
    let mut fewer = labels[..8 + 9_999].to_vec();
    fewer[4..8].copy_from_slice(&9_999u32.to_be_bytes());
    std::fs::File::create(&short)
        .unwrap()
        .write_all(&fewer)
        .unwrap();
    assert!(read_digits(&data("mnist-10k-images-idx3-ubyte.gz"), &short, 10).is_err());
    // Not a label file, not a file, no file.
    assert!(read_labels(&data("mnist-10k-images-idx3-ubyte.gz"), 10).is_err());
    assert!(read_images(&data("mnist-10k-labels-idx1-ubyte.gz")).is_err());
    assert!(read_labels(&dir, 10).is_err());
    assert!(read_labels(&dir.join("absent"), 10).is_err());
}
