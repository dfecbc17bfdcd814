//! The control plane's command line, run as a user runs it.

use std::path::Path;

use edgerec_e2e::{control_plane, stderr_of_failure, stdout_of};

fn arg(path: &Path) -> &str {
    path.to_str().unwrap()
}

#[test]
fn synthetic_data_from_generation_to_fitted_preprocessing() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let out = stdout_of(&control_plane([
        "generate",
        "--users",
        "400",
        "--videos",
        "300",
        "--interactions",
        "20000",
        "--seed",
        "9",
        "--out",
        arg(&data),
    ]));
    assert!(
        out.starts_with("generated 400 users, 300 videos, 15 channels, 20000 interactions"),
        "{out}"
    );

    let out = stdout_of(&control_plane(["split", "--data", arg(&data)]));
    assert!(
        out.starts_with("split 20000 interactions into train "),
        "{out}"
    );
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(data.join("split/split.json")).unwrap())
            .unwrap();
    let parts =
        ["train", "validation", "test"].map(|p| manifest[p]["interactions"].as_u64().unwrap());
    assert_eq!(parts.iter().sum::<u64>(), 20_000);
    assert!(parts[1] > 0 && parts[2] > 0, "{parts:?}");

    let out = stdout_of(&control_plane(["preprocess", "--data", arg(&data)]));
    assert!(
        out.starts_with(&format!(
            "fitted preprocessing on {} training interactions",
            parts[0]
        )),
        "{out}"
    );
    let preprocessor = std::fs::read(data.join("split/preprocessor.msgpack")).unwrap();
    let fitted = edge::preprocess::Preprocessor::from_bytes(&preprocessor).unwrap();
    assert_eq!(fitted.countries.known_len(), 12);

    // Train briefly, then evaluate the saved model: the table must show the same numbers.
    let config = dir.path().join("edgerec.toml");
    std::fs::write(&config, "[two_tower]\nepochs = 1\nhidden_layers = [32]\n").unwrap();
    let model = dir.path().join("model");
    let out = stdout_of(&control_plane([
        "train",
        "two-tower",
        "--data",
        arg(&data),
        "--config",
        arg(&config),
        "--out",
        arg(&model),
    ]));
    let trained_row = out
        .lines()
        .find(|l| l.starts_with("two-tower"))
        .unwrap()
        .to_owned();
    for file in [
        "model.safetensors",
        "preprocessor.msgpack",
        "report.json",
        "user_tower.onnx",
        "shard.bin",
    ] {
        assert!(
            model.join(file).is_file(),
            "{file} missing after training:\n{out}"
        );
    }
    let out = stdout_of(&control_plane([
        "eval",
        "retrieval",
        "--data",
        arg(&data),
        "--model",
        arg(&model),
    ]));
    assert!(
        out.lines().any(|l| l == trained_row),
        "{out}\nexpected the row {trained_row}"
    );

    // The ranker on the saved two-tower model, then evaluated from its JSON file: the
    // table must show the same numbers as at training.
    std::fs::write(
        &config,
        "[two_tower]\nepochs = 1\nhidden_layers = [32]\n[ranker]\niterations = 30\n",
    )
    .unwrap();
    let ranker = dir.path().join("ranker");
    let out = stdout_of(&control_plane([
        "train",
        "ranker",
        "--data",
        arg(&data),
        "--config",
        arg(&config),
        "--model",
        arg(&model),
        "--out",
        arg(&ranker),
    ]));
    let ranked_row = out
        .lines()
        .find(|l| l.starts_with("+ranker "))
        .unwrap_or_else(|| panic!("no +ranker row in:\n{out}"))
        .to_owned();
    assert!(out.lines().any(|l| l == trained_row), "{out}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ranker.join("report.json")).unwrap())
            .unwrap();
    assert!(report["rows"]["train_positives"].as_u64().unwrap() > 0);
    let json = std::fs::read_to_string(ranker.join("ranker.json")).unwrap();
    let saved = edge::ranker::RankerModel::from_catboost_json(&json).unwrap();
    assert_eq!(saved.row_width(), edge::ranker::features::COLUMNS.len());
    let out = stdout_of(&control_plane([
        "eval",
        "ranking",
        "--data",
        arg(&data),
        "--model",
        arg(&model),
        "--ranker",
        arg(&ranker.join("ranker.json")),
    ]));
    assert!(
        out.lines().any(|l| l == ranked_row),
        "{out}\nexpected the row {ranked_row}"
    );

    // Everything serving needs, in one verified bundle named by its sha256.
    let ranker_json = ranker.join("ranker.json");
    let bundle_build = |options: &[&str]| {
        let inputs = ["--data", arg(&data), "--model", arg(&model)];
        control_plane(
            ["bundle", "build"]
                .into_iter()
                .chain(inputs)
                .chain(["--ranker", arg(&ranker_json)])
                .chain(options.iter().copied()),
        )
    };
    let bundles = dir.path().join("bundles");
    let out = stdout_of(&bundle_build(&[
        "--promoted",
        "3,5",
        "--out",
        arg(&bundles),
    ]));
    let files: Vec<_> = std::fs::read_dir(&bundles)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1, "{out}");
    let bytes = std::fs::read(&files[0]).unwrap();
    let sha = edge::bundle::sha256_hex(&bytes);
    assert_eq!(
        files[0].file_name().unwrap().to_str().unwrap(),
        format!("{sha}.bundle")
    );
    assert!(out.contains(&sha), "{out}");
    let view = edge::bundle::BundleView::parse(&bytes).unwrap();
    assert_eq!(
        view.header.sections.len(),
        edge::bundle::SectionKind::ALL.len()
    );
    // The bundle carries the trained JSON's model in its binary form.
    let ranker_section = view.section(edge::bundle::SectionKind::Ranker).unwrap();
    assert_eq!(
        edge::ranker::RankerModel::from_bytes(ranker_section).unwrap(),
        edge::ranker::RankerModel::from_catboost_json(&json).unwrap()
    );
    assert!(
        ranker_section.len() < json.len() / 2,
        "{} bytes",
        ranker_section.len()
    );
    let catalog = edge::catalog::Catalog::from_bytes(
        view.section(edge::bundle::SectionKind::Videos).unwrap(),
    )
    .unwrap();
    assert_eq!(catalog.len(), 300);
    let spec = edge::tower::UserTowerSpec::from_bytes(
        view.require(edge::bundle::SectionKind::TowerSpec).unwrap(),
    )
    .unwrap();
    // The bundle's tower reads its large tables from their own section.
    let tables = edge::tower::TowerTables::from_section(bytes::Bytes::copy_from_slice(
        view.require(edge::bundle::SectionKind::TowerTables)
            .unwrap(),
    ))
    .unwrap();
    assert!(!tables.layouts().is_empty());
    let tower = edge::tower::UserTower::load_with_tables(
        view.require(edge::bundle::SectionKind::UserTower).unwrap(),
        Some(tables),
        spec.clone(),
    )
    .unwrap();
    let anonymous = edge::tower::encode_user(
        &edge::preprocess::Preprocessor::from_bytes(
            view.require(edge::bundle::SectionKind::Preprocessor)
                .unwrap(),
        )
        .unwrap(),
        &spec,
        &edge::tower::Viewer::default(),
        &[],
        |_| None,
    );
    let embedding = tower.embed(&[anonymous]).unwrap();
    let norm: f32 = embedding.iter().map(|x| x * x).sum::<f32>().sqrt();
    assert!(
        (norm - 1.0).abs() < 1e-4,
        "the tower's output is unit length: {norm}"
    );
    assert!(catalog.get(3).unwrap().promoted() && !catalog.get(4).unwrap().promoted());
    let err = stderr_of_failure(&bundle_build(&["--promoted", "100000"]), 1);
    assert!(
        err.contains("promoted video 100000 is not in the catalogue"),
        "{err}"
    );

    // An operator's beam width replaces the calibrated one, and the lineage says so.
    let narrow = dir.path().join("narrow");
    stdout_of(&bundle_build(&["--shard-ef", "77", "--out", arg(&narrow)]));
    let narrow_file = std::fs::read_dir(&narrow).unwrap().next().unwrap().unwrap();
    let narrow_bytes = std::fs::read(narrow_file.path()).unwrap();
    let narrow_view = edge::bundle::BundleView::parse(&narrow_bytes).unwrap();
    let shard = edge::shard::Shard::open(
        narrow_view
            .require(edge::bundle::SectionKind::Shard)
            .unwrap()
            .to_vec(),
    )
    .unwrap();
    assert_eq!(shard.search_ef(), 77);
    assert_eq!(
        narrow_view
            .header
            .lineage
            .get("shard_ef")
            .map(String::as_str),
        Some("77")
    );
    let err = stderr_of_failure(&bundle_build(&["--shard-ef", "0"]), 2);
    assert!(err.contains("--shard-ef"), "{err}");

    // A missing or broken model is an error that says what to do.
    let err = stderr_of_failure(
        &control_plane([
            "train",
            "ranker",
            "--data",
            arg(&data),
            "--model",
            arg(&dir.path().join("nowhere")),
        ]),
        1,
    );
    assert!(err.contains("train the two-tower model first"), "{err}");
    let broken = dir.path().join("broken.json");
    std::fs::write(&broken, &json[..json.len() / 2]).unwrap();
    let err = stderr_of_failure(
        &control_plane([
            "eval",
            "ranking",
            "--data",
            arg(&data),
            "--model",
            arg(&model),
            "--ranker",
            arg(&broken),
        ]),
        1,
    );
    assert!(err.contains("broken.json"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn movielens_through_the_command_line() {
    let source = std::env::var_os("EDGEREC_ML100K")
        .expect("EDGEREC_ML100K is not set: run `cargo xtask test`");
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("ml");
    let mut args = vec!["import".into(), "movielens".into(), source];
    args.extend(["--out".into(), data.clone().into_os_string()]);
    let out = stdout_of(&control_plane(args));
    assert!(
        out.starts_with("imported 943 users, 1682 videos, 19 channels, 100000 interactions"),
        "{out}"
    );
    let out = stdout_of(&control_plane([
        "split",
        "--data",
        arg(&data),
        "--strategy",
        "time-cut",
    ]));
    assert!(
        out.starts_with(
            "split 100000 interactions into train 80000 / validation 10000 / test 10000"
        ),
        "{out}"
    );
}

#[test]
fn bad_input_fails_with_a_message_not_a_panic() {
    let err = stderr_of_failure(&control_plane(["split", "--data", "/nonexistent/data"]), 1);
    assert_eq!(
        err.trim_end(),
        "error: /nonexistent/data: not a data set folder (expected users, videos, channels and interactions .parquet files)"
    );

    let err = stderr_of_failure(
        &control_plane(["generate", "--users", "many", "--out", "/tmp/x"]),
        2,
    );
    assert!(
        err.contains("invalid value 'many' for '--users <USERS>'"),
        "{err}"
    );

    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("edgerec.toml");
    std::fs::write(&config, "[split]\nstratgy = \"time-cut\"\n").unwrap();
    let err = stderr_of_failure(&control_plane(["config", "show", arg(&config)]), 1);
    assert!(
        err.contains("unknown field `stratgy`") && err.contains("line 2"),
        "{err}"
    );

    let err = stderr_of_failure(
        &control_plane(["split", "--data", arg(dir.path()), "--strategy", "random"]),
        2,
    );
    assert!(err.contains("unknown strategy \"random\""), "{err}");

    let err = stderr_of_failure(
        &control_plane([
            "import",
            "movielens",
            arg(dir.path()),
            "--out",
            arg(dir.path()),
        ]),
        1,
    );
    assert!(err.contains("no MovieLens-100k files"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn config_show_prints_defaults_that_parse_back() {
    let out = stdout_of(&control_plane(["config", "show"]));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("edgerec.toml");
    std::fs::write(&path, &out).unwrap();
    assert_eq!(
        stdout_of(&control_plane(["config", "show", arg(&path)])),
        out
    );
    assert!(
        out.contains("[two_tower]") && out.contains("temperature = 0.05"),
        "{out}"
    );
}
