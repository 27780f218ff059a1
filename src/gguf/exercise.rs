//! A self-check over arbitrary bytes, shared by the `cargo fuzz` target and the stable mutation
//! test: parse; on success touch every accessor, dequantize small tensors, render the JSON
//! description, and check that writing the file back and re-reading it gives the same header.
//! Any panic here is a bug (malformed input must come back as an error).

use super::{GgufBuilder, GgufFile};

/// Exercises the reader and writer on `bytes`; returns whether the bytes parsed.
pub fn exercise(bytes: &[u8]) -> bool {
    let Ok(file) = GgufFile::from_bytes(bytes.to_vec()) else {
        return false;
    };
    for t in &file.tensors {
        let data = file.tensor_data(t);
        assert_eq!(data.len() as u64, t.n_bytes);
        if t.ty.can_dequantize() && t.n_elements() <= 1 << 16 {
            // Errors are fine (e.g. unsupported types); panics are not.
            let _ = file.dequantize(&t.name);
        }
    }
    let _ = crate::inspect::to_json("fuzz", &file, false);
    let _ = crate::inspect::to_text("fuzz", &file, false);

    let mut out = Vec::new();
    if GgufBuilder::from_file(&file).write_to(&mut out).is_ok() {
        let again = GgufFile::from_bytes(out).expect("a file we wrote must parse");
        assert_eq!(again.alignment, file.alignment);
        assert_eq!(again.tensors.len(), file.tensors.len());
        for (a, b) in file.tensors.iter().zip(&again.tensors) {
            assert_eq!((&a.name, a.ty, &a.dims), (&b.name, b.ty, &b.dims));
            assert_eq!(file.tensor_data(a), again.tensor_data(b));
        }
        assert_eq!(again.metadata.len(), file.metadata.len());
        for ((ka, va), (kb, vb)) in file.metadata.iter().zip(&again.metadata) {
            assert_eq!(ka, kb);
            // Compare encodings, so NaN payloads count as equal when their bits are.
            assert_eq!(format!("{va:?}"), format!("{vb:?}"));
        }
    }
    true
}
