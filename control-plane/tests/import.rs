//! CSV and MovieLens-100k import. The MovieLens tests read the real files from the folder
//! named by `EDGEREC_ML100K`, which `cargo xtask test` fetches and sets.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use control_plane::data::Dataset;
use control_plane::{csv_import, movielens};
use edge::{ContentRating, InteractionType};

const USERS_CSV: &str =
    "user_id,country,language,age,gender,occupation\n1,US,en,30,F,\n2,FR,fr,41,,artist\n";
const VIDEOS_CSV: &str = "video_id,title,category,child_categories,channel_id,duration_seconds,tags,language,upload_time,view_count,like_count,comment_count,content_rating,regions\n\
10,\"Live, at last\",Music,Rock|Live,5,240,guitar|live,en,1600000000,100,3,0,PG-13,US|CA\n\
11,Quiet,Music,,5,60,,en,,0,0,0,G,\n";
const CHANNELS_CSV: &str = "subscriber_count,channel_id,extra\n1000,5,ignored\n";
const INTERACTIONS_CSV: &str = "user_id,video_id,timestamp,interaction_type,watch_seconds,device\n1,10,1700000000,watch,200,tv\n2,11,1700000100,like,,mobile\n";

fn write_csvs(dir: &Path, replace: Option<(&str, &str)>) {
    for (name, text) in [
        ("users.csv", USERS_CSV),
        ("videos.csv", VIDEOS_CSV),
        ("channels.csv", CHANNELS_CSV),
        ("interactions.csv", INTERACTIONS_CSV),
    ] {
        let text = match replace {
            Some((file, replacement)) if file == name => replacement,
            _ => text,
        };
        std::fs::write(dir.join(name), text).unwrap();
    }
}

fn csv_error(file: &str, text: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    write_csvs(dir.path(), Some((file, text)));
    let err = csv_import::import(dir.path()).unwrap_err().to_string();
    let prefix = format!("{}: ", dir.path().join(file).display());
    err.strip_prefix(&prefix)
        .unwrap_or_else(|| panic!("{err:?} does not start with {prefix:?}"))
        .to_owned()
}

#[test]
fn csv_imports_with_lists_optionals_and_any_column_order() {
    let dir = tempfile::tempdir().unwrap();
    write_csvs(dir.path(), None);
    let dataset = csv_import::import(dir.path()).unwrap();
    assert_eq!(dataset.counts().interactions, 2);
    let video = &dataset.videos[0];
    assert_eq!(video.title, "Live, at last");
    assert_eq!(video.child_categories, ["Rock", "Live"]);
    assert_eq!(video.regions, ["US", "CA"]);
    assert_eq!(video.content_rating, ContentRating::Teen);
    assert_eq!(video.upload_time, Some(1_600_000_000));
    assert_eq!(dataset.videos[1].upload_time, None);
    assert!(dataset.videos[1].tags.is_empty());
    assert_eq!(dataset.users[0].occupation, None);
    assert_eq!(dataset.users[1].gender, None);
    assert_eq!(dataset.channels[0].subscriber_count, 1000);
    assert_eq!(
        dataset.interactions[1].interaction_type,
        InteractionType::Like
    );
    assert_eq!(dataset.interactions[1].watch_seconds, None);

    let out = tempfile::tempdir().unwrap();
    dataset
        .save(out.path(), "csv", serde_json::json!({}))
        .unwrap();
    assert_eq!(Dataset::load(out.path()).unwrap(), dataset);
}

#[test]
fn csv_bad_input_names_file_row_and_column() {
    assert_eq!(
        csv_error(
            "users.csv",
            "user_id,country,language,gender,occupation\n1,US,en,F,\n"
        ),
        "missing column `age`"
    );
    assert_eq!(
        csv_error(
            "users.csv",
            "user_id,country,language,age,gender,occupation\n1,US,en,30,F,\n2,FR,fr,forty,,\n"
        ),
        "row 2, column `age`: \"forty\": invalid digit found in string"
    );
    assert_eq!(
        csv_error(
            "users.csv",
            "user_id,country,language,age,gender,occupation\n1,,en,30,F,\n2,FR,fr,41,,\n"
        ),
        "row 1, column `country`: missing value"
    );
    assert_eq!(
        csv_error(
            "interactions.csv",
            "user_id,video_id,timestamp,interaction_type,watch_seconds,device\n1,10,5,watched,,tv\n"
        ),
        "row 1, column `interaction_type`: \"watched\": unknown interaction type \"watched\", expected one of impression, click, watch, like, comment, share"
    );
    assert_eq!(
        csv_error(
            "interactions.csv",
            "user_id,video_id,timestamp,interaction_type,watch_seconds,device\n1,10,5,watch,,tv\n3,10,6,watch,,tv\n"
        ),
        "row 2, column `user_id`: id 3 is not in users.csv"
    );
    assert!(
        csv_error("channels.csv", "channel_id,subscriber_count\n5,1000,7\n").contains("record"),
        "a row with more fields than the header is refused"
    );
    let dir = tempfile::tempdir().unwrap();
    let err = csv_import::import(dir.path()).unwrap_err().to_string();
    assert!(
        err.starts_with(&format!("{}", dir.path().join("users.csv").display())),
        "{err}"
    );
}

fn movielens_dir() -> PathBuf {
    PathBuf::from(std::env::var_os("EDGEREC_ML100K").expect(
        "EDGEREC_ML100K is not set: run `cargo xtask test`, which fetches MovieLens-100k and sets it",
    ))
}

#[test]
fn movielens_atomic_files_import_exactly() {
    let dataset = movielens::import(&movielens_dir()).unwrap();
    let counts = dataset.counts();
    assert_eq!(
        (counts.users, counts.videos, counts.interactions),
        (943, 1682, 100_000)
    );
    assert_eq!(counts.channels, 19, "one channel per primary genre");

    let user = dataset.users.iter().find(|u| u.user_id == 1).unwrap();
    assert_eq!(
        (user.age, user.gender.as_deref(), user.occupation.as_deref()),
        (24, Some("M"), Some("technician"))
    );
    assert_eq!(
        (user.country.as_str(), user.language.as_str()),
        ("US", "en")
    );
    let canadians = dataset.users.iter().filter(|u| u.country == "CA").count();
    assert!(
        canadians > 0 && canadians < 30,
        "{canadians} users with Canadian postal codes"
    );

    let toy_story = dataset.videos.iter().find(|v| v.video_id == 1).unwrap();
    assert_eq!(toy_story.title, "Toy Story");
    assert_eq!(toy_story.category, "Animation");
    assert_eq!(toy_story.child_categories, ["Children's", "Comedy"]);
    assert_eq!(toy_story.upload_time, Some(788_918_400), "1995-01-01");
    let undated = dataset.videos.iter().find(|v| v.video_id == 267).unwrap();
    assert_eq!(undated.upload_time, None);
    assert_eq!(undated.category, "unknown");

    // The first rating of the file: user 196 gave movie 242 a 3.
    let first = &dataset.interactions[0];
    assert_eq!(
        (first.user_id, first.video_id, first.timestamp),
        (196, 242, 881_250_949)
    );
    assert_eq!(first.interaction_type, InteractionType::Watch);
    let likes = dataset
        .interactions
        .iter()
        .filter(|i| i.interaction_type == InteractionType::Like)
        .count();
    assert_eq!(likes, 55_375, "ratings of 4 and 5");
}

/// Writes the original GroupLens layout (`u.data`, `u.item`, `u.user`) of a data set
/// imported from the atomic files, with the original's quirks: "(year)" after titles,
/// dates as "01-Jan-1995", genre flag columns, ISO-8859-1 text.
fn write_original_layout(dataset: &Dataset, dir: &Path) {
    let mut data = String::new();
    for i in &dataset.interactions {
        let rating = if i.interaction_type == InteractionType::Like {
            5
        } else {
            3
        };
        writeln!(
            data,
            "{}\t{}\t{}\t{}",
            i.user_id, i.video_id, rating, i.timestamp
        )
        .unwrap();
    }
    std::fs::write(dir.join("u.data"), data).unwrap();
    let mut items = Vec::new();
    for v in &dataset.videos {
        let year = v
            .upload_time
            .map(|t| 1970 + (t as f64 / 31_556_952.0).round() as i64);
        let title = match year {
            Some(year) => format!("{} ({year})", v.title),
            None => v.title.clone(),
        };
        let date = year.map(|y| format!("01-Jan-{y}")).unwrap_or_default();
        let flags: Vec<&str> = movielens::GENRES
            .iter()
            .map(|g| {
                if v.category == *g || v.child_categories.iter().any(|c| c == g) {
                    "1"
                } else {
                    "0"
                }
            })
            .collect();
        let line = format!(
            "{}|{}|{}||http://example.invalid/|{}\n",
            v.video_id,
            title,
            date,
            flags.join("|")
        );
        items.extend(
            line.chars()
                .map(|c| u8::try_from(u32::from(c)).expect("latin-1")),
        );
    }
    std::fs::write(dir.join("u.item"), items).unwrap();
    let mut users = String::new();
    for u in &dataset.users {
        let zip = if u.country == "CA" { "T8H1N" } else { "12345" };
        writeln!(
            users,
            "{}|{}|{}|{}|{}",
            u.user_id,
            u.age,
            u.gender.as_deref().unwrap(),
            u.occupation.as_deref().unwrap(),
            zip
        )
        .unwrap();
    }
    std::fs::write(dir.join("u.user"), users).unwrap();
}

#[test]
fn movielens_original_layout_imports_the_same() {
    let atomic = movielens::import(&movielens_dir()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    write_original_layout(&atomic, dir.path());
    assert_eq!(
        movielens::detect_layout(dir.path()).unwrap(),
        movielens::Layout::Original
    );
    let original = movielens::import(dir.path()).unwrap();
    assert_eq!(original.users, atomic.users);
    assert_eq!(original.interactions, atomic.interactions);
    assert_eq!(original.channels, atomic.channels);
    // Genres come back in GroupLens's column order, which RecBole's files keep.
    assert_eq!(original.videos.len(), atomic.videos.len());
    for (original, atomic) in original.videos.iter().zip(&atomic.videos) {
        assert_eq!(original, atomic);
    }
}

#[test]
fn movielens_bad_input_names_file_row_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let err = movielens::import(dir.path()).unwrap_err().to_string();
    assert!(err.contains("no MovieLens-100k files"), "{err}");

    for name in ["ml-100k.user", "ml-100k.item"] {
        std::fs::copy(movielens_dir().join(name), dir.path().join(name)).unwrap();
    }
    let inter = dir.path().join("ml-100k.inter");
    std::fs::write(&inter, "user_id:token\titem_id:token\trating:float\ttimestamp:float\n196\t242\t3\t881250949\n186\t302\tthree\t891717742\n").unwrap();
    let err = movielens::import(dir.path()).unwrap_err().to_string();
    assert_eq!(
        err,
        format!(
            "{}: row 2, column `rating`: \"three\": invalid float literal",
            inter.display()
        )
    );
    std::fs::write(
        &inter,
        "user_id:token\titem_id:token\ttimestamp:float\n196\t242\t881250949\n",
    )
    .unwrap();
    let err = movielens::import(dir.path()).unwrap_err().to_string();
    assert_eq!(err, format!("{}: missing column `rating`", inter.display()));
    std::fs::write(
        &inter,
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n9999\t242\t3\t881250949\n",
    )
    .unwrap();
    let err = movielens::import(dir.path()).unwrap_err().to_string();
    assert_eq!(
        err,
        format!(
            "{}: row 1, column `user_id`: id 9999 is not in ml-100k.user",
            inter.display()
        )
    );
}
