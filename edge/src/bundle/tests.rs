use super::*;
use xxhash_rust::xxh3::xxh3_64;

fn sample() -> (BundleBuilder, Vec<(SectionKind, Vec<u8>)>) {
    let sections: Vec<(SectionKind, Vec<u8>)> = SectionKind::ALL
        .iter()
        .enumerate()
        .map(|(i, &kind)| (kind, (0..40 + 13 * i).map(|b| (b * 7 + i) as u8).collect()))
        .collect();
    let mut builder = BundleBuilder::new("m-2026-11-26-1", 1_764_115_200)
        .lineage("data_version", "d-abc")
        .lineage("code_version", "0.1.0");
    for (kind, bytes) in &sections {
        builder = builder.section(*kind, bytes.clone());
    }
    (builder, sections)
}

fn message(bytes: &[u8]) -> String {
    BundleView::parse(bytes).unwrap_err().to_string()
}

#[test]
fn sha256_is_the_standard_one() {
    assert_eq!(
        sha256_hex(b"abc"),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
}

#[test]
fn a_bundle_reads_back_with_its_header_and_sections() {
    let (builder, sections) = sample();
    let bytes = builder.to_bytes().unwrap();
    let view = BundleView::parse(&bytes).unwrap();
    assert_eq!(view.header.format_version, BUNDLE_FORMAT_VERSION);
    assert_eq!(view.header.model_version, "m-2026-11-26-1");
    assert_eq!(view.header.created_at, 1_764_115_200);
    assert_eq!(view.header.lineage["data_version"], "d-abc");
    assert_eq!(view.header.sections.len(), SectionKind::ALL.len());
    for (kind, expected) in &sections {
        assert_eq!(view.section(*kind).unwrap(), expected.as_slice());
        let entry = view
            .header
            .sections
            .iter()
            .find(|e| e.kind == *kind)
            .unwrap();
        assert_eq!(entry.sha256, sha256_hex(expected));
        assert_eq!(entry.xxh3, xxh3_64(expected));
    }
    view.verify_sha256().unwrap();
    // The same inputs give the same bytes: bundles are content-addressed.
    assert_eq!(sample().0.to_bytes().unwrap(), bytes);
}

#[test]
fn any_messagepack_reader_sees_one_array_of_magic_header_and_sections() {
    let (builder, _) = sample();
    let bytes = builder.to_bytes().unwrap();
    let elements: Vec<serde::de::IgnoredAny> = rmp_serde::from_slice(&bytes).unwrap();
    assert_eq!(elements.len(), 2 + SectionKind::ALL.len());
}

#[test]
fn every_truncation_is_refused_and_names_the_cut_section() {
    let (builder, _) = sample();
    let bytes = builder.to_bytes().unwrap();
    let view = BundleView::parse(&bytes).unwrap();
    // Where each section's bytes start and end in the file.
    let mut spans = Vec::new();
    for entry in &view.header.sections {
        let body = view.section(entry.kind).unwrap();
        let start = body.as_ptr() as usize - bytes.as_ptr() as usize;
        spans.push((entry.kind, start, start + body.len()));
    }
    let first_body = spans[0].1;
    for cut in 0..bytes.len() {
        let error = message(&bytes[..cut]);
        assert!(error.starts_with("invalid bundle"), "cut {cut}: {error}");
        if let Some((kind, ..)) = spans
            .iter()
            .find(|(_, start, end)| cut > *start && cut < *end)
        {
            assert!(
                error.contains(&format!("section `{}`", kind.name()))
                    && error.contains("truncated"),
                "cut {cut} inside {}: {error}",
                kind.name()
            );
        } else if cut > first_body {
            // Cut at a section boundary or inside a bin marker: the next section is named.
            assert!(error.contains("section `"), "cut {cut}: {error}");
        }
    }
}

#[test]
fn a_flipped_byte_in_any_section_is_refused_and_names_it() {
    let (builder, _) = sample();
    let bytes = builder.to_bytes().unwrap();
    let view = BundleView::parse(&bytes).unwrap();
    for entry in &view.header.sections {
        let body = view.section(entry.kind).unwrap();
        let at = body.as_ptr() as usize - bytes.as_ptr() as usize + body.len() / 2;
        let mut corrupt = bytes.clone();
        corrupt[at] ^= 0x40;
        assert_eq!(
            message(&corrupt),
            format!(
                "invalid bundle: section `{}` is corrupted: its xxh3 does not match the header's",
                entry.kind.name()
            )
        );
    }
}

#[test]
fn verify_sha256_catches_a_section_whose_sha256_the_header_does_not_match() {
    let (builder, _) = sample();
    let bytes = builder.to_bytes().unwrap();
    let mut view = BundleView::parse(&bytes).unwrap();
    // A header whose xxh3s were recomputed by a forger but whose sha256s were not.
    view.header.sections[2].sha256 = sha256_hex(b"something else");
    assert_eq!(
        view.verify_sha256().unwrap_err().to_string(),
        format!(
            "invalid bundle: section `{}` is corrupted: its sha256 does not match the header's",
            view.header.sections[2].kind.name()
        )
    );
}

#[test]
fn other_files_versions_and_extra_bytes_are_refused() {
    assert!(message(b"").contains("not an edgerec bundle"));
    assert!(message(b"{\"json\": true}").contains("not an edgerec bundle"));
    let not_ours = rmp_serde::to_vec(&("other-format", 1)).unwrap();
    assert!(message(&not_ours).contains("not an edgerec bundle"));

    let (builder, _) = sample();
    let mut bytes = builder.to_bytes().unwrap();
    // The header is a map whose first key is `format_version`; bump the value after it.
    let key = b"format_version";
    let at = bytes.windows(key.len()).position(|w| w == key).unwrap() + key.len();
    assert_eq!(bytes[at], BUNDLE_FORMAT_VERSION as u8, "a positive fixint");
    let mut newer = bytes.clone();
    newer[at] = BUNDLE_FORMAT_VERSION as u8 + 1;
    assert_eq!(
        message(&newer),
        format!(
            "bundle has format version {}, this build reads version {BUNDLE_FORMAT_VERSION}",
            BUNDLE_FORMAT_VERSION + 1
        )
    );

    bytes.push(0);
    assert_eq!(
        message(&bytes),
        "invalid bundle: 1 unexpected bytes after the last section"
    );
}

#[test]
fn a_missing_section_is_named_when_required() {
    let bytes = BundleBuilder::new("m1", 0)
        .section(SectionKind::Shard, vec![1, 2, 3])
        .to_bytes()
        .unwrap();
    let view = BundleView::parse(&bytes).unwrap();
    assert_eq!(view.require(SectionKind::Shard).unwrap(), &[1, 2, 3]);
    assert_eq!(
        view.require(SectionKind::Ranker).unwrap_err().to_string(),
        "invalid bundle: section `ranker` is missing from the bundle"
    );
    assert!(
        BundleBuilder::new("", 0)
            .to_bytes()
            .unwrap_err()
            .to_string()
            .contains("model version is empty")
    );
}
