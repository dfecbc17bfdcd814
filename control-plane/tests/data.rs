//! Data sets on disk: round trips, and one test per kind of bad input, each checking that
//! the error names the file, the row and the column.

use std::path::Path;
use std::sync::Arc;

use arrow_array::{ArrayRef, RecordBatch, StringArray, UInt8Array, UInt64Array};
use arrow_schema::{DataType, Field, Schema};
use control_plane::data::Dataset;
use control_plane::parquet_io::{Table, TableWriter, read_table, write_table};
use edge::{Channel, ContentRating, Interaction, InteractionType, User, Video};

fn small_dataset() -> Dataset {
    Dataset {
        users: vec![
            User {
                user_id: 1,
                country: "US".into(),
                language: "en".into(),
                age: 30,
                gender: Some("F".into()),
                occupation: None,
            },
            User {
                user_id: 2,
                country: "FR".into(),
                language: "fr".into(),
                age: 41,
                gender: None,
                occupation: Some("artist".into()),
            },
        ],
        videos: vec![Video {
            video_id: 10,
            title: "Ünïcode title, with \"quotes\"".into(),
            category: "Music".into(),
            child_categories: vec!["Rock".into(), "Live".into()],
            channel_id: 5,
            duration_seconds: 240,
            tags: vec![],
            language: "en".into(),
            upload_time: Some(-86_400),
            view_count: u64::MAX,
            like_count: 3,
            comment_count: 0,
            content_rating: ContentRating::Teen,
            regions: vec!["US".into(), "CA".into()],
        }],
        channels: vec![Channel {
            channel_id: 5,
            subscriber_count: 1_000,
        }],
        interactions: vec![
            Interaction {
                user_id: 1,
                video_id: 10,
                timestamp: 1_700_000_000,
                interaction_type: InteractionType::Watch,
                watch_seconds: Some(200),
                device: "tv".into(),
            },
            Interaction {
                user_id: 2,
                video_id: 10,
                timestamp: 1_700_000_100,
                interaction_type: InteractionType::Share,
                watch_seconds: None,
                device: "mobile".into(),
            },
        ],
    }
}

fn save(dataset: &Dataset, dir: &Path) {
    dataset.save(dir, "test", serde_json::json!({})).unwrap();
}

/// Writes `batch` over `path` with the plain Arrow writer, bypassing our schema.
fn overwrite(path: &Path, batch: &RecordBatch) {
    let file = std::fs::File::create(path).unwrap();
    let mut writer = parquet::arrow::ArrowWriter::try_new(file, batch.schema(), None).unwrap();
    writer.write(batch).unwrap();
    writer.close().unwrap();
}

#[test]
fn dataset_round_trips_through_parquet() {
    let dir = tempfile::tempdir().unwrap();
    let dataset = small_dataset();
    let manifest = dataset
        .save(dir.path(), "test", serde_json::json!({}))
        .unwrap();
    assert_eq!(manifest.counts.interactions, 2);
    assert_eq!(manifest.time_range, Some((1_700_000_000, 1_700_000_100)));
    assert_eq!(Dataset::load(dir.path()).unwrap(), dataset);
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn large_tables_stream_in_batches() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(Interaction::FILE);
    let rows: Vec<Interaction> = (0..200_000u64)
        .map(|i| Interaction {
            user_id: i % 97,
            video_id: i,
            timestamp: i as i64,
            interaction_type: InteractionType::ALL[i as usize % 6],
            watch_seconds: (i % 3 == 0).then_some(i as u32),
            device: "desktop".into(),
        })
        .collect();
    write_table(&path, &rows).unwrap();
    assert_eq!(read_table::<Interaction>(&path).unwrap(), rows);
}

#[test]
fn an_unfinished_writer_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(Channel::FILE);
    let mut writer = TableWriter::<Channel>::create(&path).unwrap();
    writer
        .push(Channel {
            channel_id: 1,
            subscriber_count: 2,
        })
        .unwrap();
    drop(writer);
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

/// Saves the small data set, then replaces `users.parquet` by a file with these columns.
fn load_with_users(dir: &Path, fields: Vec<Field>, columns: Vec<ArrayRef>) -> String {
    save(&small_dataset(), dir);
    let batch = RecordBatch::try_new(Arc::new(Schema::new(fields)), columns).unwrap();
    overwrite(&dir.join(User::FILE), &batch);
    Dataset::load(dir).unwrap_err().to_string()
}

fn users_path(dir: &Path) -> String {
    dir.join(User::FILE).display().to_string()
}

fn user_columns(age: ArrayRef, country: ArrayRef) -> Vec<ArrayRef> {
    vec![
        Arc::new(UInt64Array::from(vec![1, 2])),
        country,
        Arc::new(StringArray::from(vec!["en", "fr"])),
        age,
        Arc::new(StringArray::from(vec![Some("F"), None])),
        Arc::new(StringArray::from(vec![None, Some("artist")])),
    ]
}

fn countries() -> ArrayRef {
    Arc::new(StringArray::from(vec!["US", "FR"]))
}

#[test]
fn missing_column_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let mut fields = User::fields();
    fields.remove(3);
    let mut columns = user_columns(Arc::new(UInt8Array::from(vec![30, 41])), countries());
    columns.remove(3);
    let err = load_with_users(dir.path(), fields, columns);
    assert_eq!(
        err,
        format!("{}: missing column `age`", users_path(dir.path()))
    );
}

#[test]
fn wrong_type_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let mut fields = User::fields();
    fields[3] = Field::new("age", DataType::Utf8, false);
    let columns = user_columns(
        Arc::new(StringArray::from(vec!["thirty", "41"])),
        countries(),
    );
    let err = load_with_users(dir.path(), fields, columns);
    assert_eq!(
        err,
        format!(
            "{}: column `age` has type Utf8, expected UInt8",
            users_path(dir.path())
        )
    );
}

#[test]
fn null_in_a_required_column_names_the_row() {
    let dir = tempfile::tempdir().unwrap();
    let mut fields = User::fields();
    fields[1] = Field::new("country", DataType::Utf8, true);
    let columns = user_columns(
        Arc::new(UInt8Array::from(vec![30, 41])),
        Arc::new(StringArray::from(vec![Some("US"), None])),
    );
    let err = load_with_users(dir.path(), fields, columns);
    assert_eq!(
        err,
        format!(
            "{}: row 2, column `country`: missing value",
            users_path(dir.path())
        )
    );
}

#[test]
fn out_of_range_value_names_the_row() {
    let dir = tempfile::tempdir().unwrap();
    let columns = user_columns(Arc::new(UInt8Array::from(vec![30, 200])), countries());
    let err = load_with_users(dir.path(), User::fields(), columns);
    assert_eq!(
        err,
        format!(
            "{}: row 2, column `age`: 200 is not an age in years (0-120)",
            users_path(dir.path())
        )
    );
}

#[test]
fn duplicate_id_names_the_row() {
    let dir = tempfile::tempdir().unwrap();
    let mut dataset = small_dataset();
    dataset.users[1].user_id = 1;
    dataset.interactions[1].user_id = 1;
    save(&dataset, dir.path());
    let err = Dataset::load(dir.path()).unwrap_err().to_string();
    assert_eq!(
        err,
        format!(
            "{}: row 2, column `user_id`: duplicate id 1",
            users_path(dir.path())
        )
    );
}

#[test]
fn dangling_ids_name_the_row_and_the_missing_target() {
    let dir = tempfile::tempdir().unwrap();
    let mut dataset = small_dataset();
    dataset.interactions[1].video_id = 99;
    save(&dataset, dir.path());
    let err = Dataset::load(dir.path()).unwrap_err().to_string();
    assert_eq!(
        err,
        format!(
            "{}: row 2, column `video_id`: id 99 is not in videos.parquet",
            dir.path().join(Interaction::FILE).display()
        )
    );

    let mut dataset = small_dataset();
    dataset.videos[0].channel_id = 6;
    save(&dataset, dir.path());
    let err = Dataset::load(dir.path()).unwrap_err().to_string();
    assert!(
        err.ends_with(
            "videos.parquet: row 1, column `channel_id`: id 6 is not in channels.parquet"
        ),
        "{err}"
    );
}

#[test]
fn unknown_enum_value_names_the_row() {
    let dir = tempfile::tempdir().unwrap();
    save(&small_dataset(), dir.path());
    let mut columns = Video::columns(&small_dataset().videos);
    let rating = Video::fields()
        .iter()
        .position(|f| f.name() == "content_rating")
        .unwrap();
    columns[rating] = Arc::new(StringArray::from(vec!["X"]));
    let batch = RecordBatch::try_new(Video::schema(), columns).unwrap();
    overwrite(&dir.path().join(Video::FILE), &batch);
    let err = Dataset::load(dir.path()).unwrap_err().to_string();
    assert!(
        err.ends_with(
            "videos.parquet: row 1, column `content_rating`: unknown content rating \"X\", expected one of G, PG, PG-13, R, NC-17"
        ),
        "{err}"
    );
}

#[test]
fn unreadable_and_truncated_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    save(&small_dataset(), dir.path());
    let path = dir.path().join(Interaction::FILE);
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let err = Dataset::load(dir.path()).unwrap_err().to_string();
    assert!(
        err.starts_with(&format!("{}: unreadable:", path.display())),
        "{err}"
    );

    std::fs::write(&path, b"user_id,video_id\n1,2\n").unwrap();
    let err = Dataset::load(dir.path()).unwrap_err().to_string();
    assert!(
        err.starts_with(&format!("{}: unreadable:", path.display())),
        "{err}"
    );

    std::fs::remove_file(&path).unwrap();
    let err = Dataset::load(dir.path()).unwrap_err().to_string();
    assert!(err.starts_with(&path.display().to_string()), "{err}");
    assert!(err.contains("No such file"), "{err}");
}

#[test]
fn a_folder_that_is_not_a_data_set() {
    let err = Dataset::load(Path::new("/nonexistent/edgerec"))
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("/nonexistent/edgerec: not a data set folder"),
        "{err}"
    );
}
