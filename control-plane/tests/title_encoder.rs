//! all-MiniLM-L6-v2 run by candle-transformers (from `EDGEREC_TITLE_MODEL`, set by `cargo
//! xtask test`): unit vectors that place paraphrases together, independent of batching
//! and padding, and clear errors for a missing model.

use std::path::PathBuf;
use std::sync::OnceLock;

use control_plane::title_encoder::{TitleEncoder, TitleEncoderError};

fn encoder() -> &'static TitleEncoder {
    static ENCODER: OnceLock<TitleEncoder> = OnceLock::new();
    ENCODER.get_or_init(|| {
        let folder = PathBuf::from(
            std::env::var_os("EDGEREC_TITLE_MODEL")
                .expect("EDGEREC_TITLE_MODEL is not set: run `cargo xtask test`"),
        );
        TitleEncoder::load(&folder).unwrap()
    })
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[test]
fn paraphrases_are_closer_than_unrelated_titles() {
    let titles = [
        "A cat sleeping on the sofa",
        "Kitten napping on a couch",
        "Stock market crashes after interest rate hike",
        "Central bank raises rates, shares tumble",
        "How to bake sourdough bread at home",
    ];
    let encoder = encoder();
    assert_eq!(encoder.dim(), 384);
    let vectors = encoder.encode(&titles, |_| {}).unwrap();
    let v: Vec<&[f32]> = vectors.chunks_exact(384).collect();
    assert_eq!(v.len(), titles.len());
    for vector in &v {
        assert!((dot(vector, vector) - 1.0).abs() < 1e-4);
    }
    let (cats, markets) = (dot(v[0], v[1]), dot(v[2], v[3]));
    for unrelated in [
        dot(v[0], v[2]),
        dot(v[1], v[3]),
        dot(v[0], v[4]),
        dot(v[2], v[4]),
    ] {
        assert!(
            cats > unrelated + 0.2 && markets > unrelated + 0.2,
            "paraphrases {cats:.3} and {markets:.3}, unrelated {unrelated:.3}"
        );
    }
}

#[test]
fn a_title_gets_the_same_vector_alone_or_padded_in_a_batch() {
    let encoder = encoder();
    let short = "Toy Story (1995)";
    let long = "Dr. Strangelove or: How I Learned to Stop Worrying and Love the Bomb (1963)";
    let alone = encoder.encode(&[short], |_| {}).unwrap();
    // In this batch the short title is padded to the long one's length.
    let batched = encoder.encode(&[long, short, long], |_| {}).unwrap();
    let in_batch = &batched[384..768];
    let largest = alone
        .iter()
        .zip(in_batch)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0_f32, f32::max);
    assert!(largest < 1e-5, "differs by {largest}");
    assert_eq!(&batched[..384], &batched[768..]);
}

#[test]
fn progress_counts_distinct_titles() {
    let titles = ["one", "two", "one", "three", "two"];
    assert_eq!(TitleEncoder::distinct(&titles), 3);
    let mut seen = Vec::new();
    let vectors = encoder().encode(&titles, |done| seen.push(done)).unwrap();
    assert_eq!(vectors.len(), 5 * 384);
    assert_eq!(seen.last(), Some(&3));
    assert_eq!(&vectors[..384], &vectors[2 * 384..3 * 384]);
}

#[test]
fn a_missing_or_broken_model_folder_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let err = TitleEncoder::load(dir.path()).err().unwrap();
    assert!(matches!(err, TitleEncoderError::Files { .. }));
    let message = err.to_string();
    assert!(
        message.contains("config.json") && message.contains("cargo xtask fixtures"),
        "{message}"
    );

    let source = PathBuf::from(std::env::var_os("EDGEREC_TITLE_MODEL").unwrap());
    for name in ["config.json", "tokenizer.json"] {
        std::fs::copy(source.join(name), dir.path().join(name)).unwrap();
    }
    std::fs::write(dir.path().join("model.safetensors"), b"not safetensors").unwrap();
    let message = TitleEncoder::load(dir.path()).err().unwrap().to_string();
    assert!(message.contains("model.safetensors"), "{message}");
}
