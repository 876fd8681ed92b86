//! Decoding untrusted files without amplification: the sequences of a weight file (nodes,
//! tensor records, attributes) are charged, element by element, against a budget
//! proportional to the file's size.
//!
//! bincode's own byte limit counts strings and byte buffers but not the in-memory size of
//! decoded structs: a file of a million 4-byte empty tensor records would decode into a million
//! 96-byte structs (a 24× amplification) before any check could see them. Charging each
//! element's size as it is decoded refuses such a file while it is still small in memory.

use serde::de::{Deserialize, Deserializer, Error, SeqAccess, Visitor};
use std::cell::Cell;
use std::marker::PhantomData;

thread_local! {
    /// Bytes that decoded sequence elements may still take; unlimited outside a checked
    /// decode (a description read from JSON, say).
    static BUDGET: Cell<usize> = const { Cell::new(usize::MAX) };
}

/// Runs `decode` with `bytes` of budget for the sequences it decodes on this thread.
pub(crate) fn with_budget<R>(bytes: usize, decode: impl FnOnce() -> R) -> R {
    let previous = BUDGET.with(|budget| budget.replace(bytes));
    let result = decode();
    BUDGET.with(|budget| budget.set(previous));
    result
}

/// A `Vec` deserialised element by element, each charged its size against the budget
/// (`#[serde(deserialize_with = "crate::bounded::vec")]`).
pub(crate) fn vec<'de, D, T>(deserializer: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    struct Elements<T>(PhantomData<T>);
    impl<'de, T: Deserialize<'de>> Visitor<'de> for Elements<T> {
        type Value = Vec<T>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a sequence")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
            let mut elements = Vec::new();
            while let Some(element) = seq.next_element()? {
                let size = std::mem::size_of::<T>().max(1);
                let left = BUDGET.with(|budget| {
                    let left = budget.get().checked_sub(size);
                    budget.set(left.unwrap_or(0));
                    left
                });
                if left.is_none() {
                    return Err(A::Error::custom(
                        "the file decodes to more memory than its size allows",
                    ));
                }
                elements.push(element);
            }
            Ok(elements)
        }
    }
    deserializer.deserialize_seq(Elements(PhantomData))
}
