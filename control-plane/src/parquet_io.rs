//! Parquet tables for the seed's entities: one schema per entity, strict checks on read
//! (every error names file, row and column), bounded-memory streaming on write, and
//! writes that land under their final name only once complete.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::builder::{ListBuilder, StringBuilder};
use arrow_array::cast::AsArray;
use arrow_array::types::{Int64Type, UInt8Type, UInt32Type, UInt64Type};
use arrow_array::{
    Array, ArrayRef, ArrowPrimitiveType, Int64Array, PrimitiveArray, RecordBatch, StringArray,
    UInt8Array, UInt32Array, UInt64Array,
};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use edge::{Channel, ContentRating, Interaction, InteractionType, User, Video};
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;

use crate::DataError;

/// Rows per Parquet row group and per write batch: bounds the writer's memory.
const ROWS_PER_BATCH: usize = 65_536;

/// An entity stored as one Parquet file.
pub trait Table: Sized {
    /// File name inside a data set folder.
    const FILE: &'static str;
    /// The columns, in order.
    fn fields() -> Vec<Field>;
    /// Arrays for `rows`, one per field.
    fn columns(rows: &[Self]) -> Vec<ArrayRef>;
    /// Rows of one batch; `columns` has been checked against [`Table::fields`].
    fn rows(columns: &Columns<'_>) -> Result<Vec<Self>, DataError>;

    /// The Arrow schema of [`Table::fields`].
    fn schema() -> SchemaRef {
        Arc::new(Schema::new(Self::fields()))
    }
}

/// Typed access to the columns of one batch, with errors that point at the cell.
pub struct Columns<'a> {
    batch: &'a RecordBatch,
    path: &'a Path,
    /// 1-based number of the batch's first row in the file.
    first_row: u64,
}

impl<'a> Columns<'a> {
    /// Rows in the batch.
    pub fn len(&self) -> usize {
        self.batch.num_rows()
    }

    /// Whether the batch is empty.
    pub fn is_empty(&self) -> bool {
        self.batch.num_rows() == 0
    }

    fn column(&self, name: &str) -> &'a ArrayRef {
        self.batch
            .column_by_name(name)
            .expect("schema was checked before reading rows")
    }

    /// The error for the cell at (`index` within this batch, `column`).
    pub fn bad_value(&self, index: usize, column: &str, message: impl Into<String>) -> DataError {
        DataError::bad_value(self.path, self.first_row + index as u64, column, message)
    }

    fn no_nulls(&self, name: &str, array: &dyn Array) -> Result<(), DataError> {
        if array.null_count() == 0 {
            return Ok(());
        }
        let index = (0..array.len()).find(|&i| array.is_null(i)).unwrap_or(0);
        Err(self.bad_value(index, name, "missing value"))
    }

    /// A non-null primitive column.
    pub fn required<T: ArrowPrimitiveType>(
        &self,
        name: &str,
    ) -> Result<&'a PrimitiveArray<T>, DataError> {
        let array = self.column(name).as_primitive::<T>();
        self.no_nulls(name, array)?;
        Ok(array)
    }

    /// A primitive column that may hold nulls.
    pub fn optional<T: ArrowPrimitiveType>(&self, name: &str) -> &'a PrimitiveArray<T> {
        self.column(name).as_primitive::<T>()
    }

    /// A non-null string column.
    pub fn required_str(&self, name: &str) -> Result<&'a StringArray, DataError> {
        let array = self.column(name).as_string::<i32>();
        self.no_nulls(name, array)?;
        Ok(array)
    }

    /// A string column that may hold nulls.
    pub fn optional_str(&self, name: &str) -> &'a StringArray {
        self.column(name).as_string::<i32>()
    }

    /// A non-null list-of-strings column, materialised.
    pub fn string_lists(&self, name: &str) -> Result<Vec<Vec<String>>, DataError> {
        let lists = self.column(name).as_list::<i32>();
        self.no_nulls(name, lists)?;
        let mut out = Vec::with_capacity(lists.len());
        for index in 0..lists.len() {
            let items = lists.value(index);
            let items = items.as_string::<i32>();
            if items.null_count() > 0 {
                return Err(self.bad_value(index, name, "missing value inside the list"));
            }
            out.push(items.iter().flatten().map(str::to_owned).collect());
        }
        Ok(out)
    }

    /// Parses a string cell into an enumeration, naming the cell on failure.
    pub fn parse<T: std::str::FromStr>(
        &self,
        array: &StringArray,
        index: usize,
        name: &str,
    ) -> Result<T, DataError>
    where
        T::Err: std::fmt::Display,
    {
        array
            .value(index)
            .parse()
            .map_err(|e: T::Err| self.bad_value(index, name, e.to_string()))
    }
}

fn strings_list_type() -> DataType {
    DataType::List(Arc::new(Field::new("item", DataType::Utf8, true)))
}

fn string_lists<'r>(lists: impl Iterator<Item = &'r Vec<String>>) -> ArrayRef {
    let mut builder = ListBuilder::new(StringBuilder::new());
    for list in lists {
        for item in list {
            builder.values().append_value(item);
        }
        builder.append(true);
    }
    Arc::new(builder.finish())
}

fn strs<'r>(values: impl Iterator<Item = &'r str>) -> ArrayRef {
    Arc::new(StringArray::from_iter_values(values))
}

fn optional_strs<'r>(values: impl Iterator<Item = Option<&'r str>>) -> ArrayRef {
    Arc::new(values.collect::<StringArray>())
}

impl Table for User {
    const FILE: &'static str = "users.parquet";

    fn fields() -> Vec<Field> {
        vec![
            Field::new("user_id", DataType::UInt64, false),
            Field::new("country", DataType::Utf8, false),
            Field::new("language", DataType::Utf8, false),
            Field::new("age", DataType::UInt8, false),
            Field::new("gender", DataType::Utf8, true),
            Field::new("occupation", DataType::Utf8, true),
        ]
    }

    fn columns(rows: &[Self]) -> Vec<ArrayRef> {
        vec![
            Arc::new(UInt64Array::from_iter_values(
                rows.iter().map(|u| u.user_id),
            )),
            strs(rows.iter().map(|u| u.country.as_str())),
            strs(rows.iter().map(|u| u.language.as_str())),
            Arc::new(UInt8Array::from_iter_values(rows.iter().map(|u| u.age))),
            optional_strs(rows.iter().map(|u| u.gender.as_deref())),
            optional_strs(rows.iter().map(|u| u.occupation.as_deref())),
        ]
    }

    fn rows(c: &Columns<'_>) -> Result<Vec<Self>, DataError> {
        let user_id = c.required::<UInt64Type>("user_id")?;
        let country = c.required_str("country")?;
        let language = c.required_str("language")?;
        let age = c.required::<UInt8Type>("age")?;
        let gender = c.optional_str("gender");
        let occupation = c.optional_str("occupation");
        let optional =
            |array: &StringArray, i: usize| (!array.is_null(i)).then(|| array.value(i).to_owned());
        Ok((0..c.len())
            .map(|i| User {
                user_id: user_id.value(i),
                country: country.value(i).to_owned(),
                language: language.value(i).to_owned(),
                age: age.value(i),
                gender: optional(gender, i),
                occupation: optional(occupation, i),
            })
            .collect())
    }
}

impl Table for Video {
    const FILE: &'static str = "videos.parquet";

    fn fields() -> Vec<Field> {
        vec![
            Field::new("video_id", DataType::UInt64, false),
            Field::new("title", DataType::Utf8, false),
            Field::new("category", DataType::Utf8, false),
            Field::new("child_categories", strings_list_type(), false),
            Field::new("channel_id", DataType::UInt64, false),
            Field::new("duration_seconds", DataType::UInt32, false),
            Field::new("tags", strings_list_type(), false),
            Field::new("language", DataType::Utf8, false),
            Field::new("upload_time", DataType::Int64, true),
            Field::new("view_count", DataType::UInt64, false),
            Field::new("like_count", DataType::UInt64, false),
            Field::new("comment_count", DataType::UInt64, false),
            Field::new("content_rating", DataType::Utf8, false),
            Field::new("regions", strings_list_type(), false),
        ]
    }

    fn columns(rows: &[Self]) -> Vec<ArrayRef> {
        vec![
            Arc::new(UInt64Array::from_iter_values(
                rows.iter().map(|v| v.video_id),
            )),
            strs(rows.iter().map(|v| v.title.as_str())),
            strs(rows.iter().map(|v| v.category.as_str())),
            string_lists(rows.iter().map(|v| &v.child_categories)),
            Arc::new(UInt64Array::from_iter_values(
                rows.iter().map(|v| v.channel_id),
            )),
            Arc::new(UInt32Array::from_iter_values(
                rows.iter().map(|v| v.duration_seconds),
            )),
            string_lists(rows.iter().map(|v| &v.tags)),
            strs(rows.iter().map(|v| v.language.as_str())),
            Arc::new(rows.iter().map(|v| v.upload_time).collect::<Int64Array>()),
            Arc::new(UInt64Array::from_iter_values(
                rows.iter().map(|v| v.view_count),
            )),
            Arc::new(UInt64Array::from_iter_values(
                rows.iter().map(|v| v.like_count),
            )),
            Arc::new(UInt64Array::from_iter_values(
                rows.iter().map(|v| v.comment_count),
            )),
            strs(rows.iter().map(|v| v.content_rating.as_str())),
            string_lists(rows.iter().map(|v| &v.regions)),
        ]
    }

    fn rows(c: &Columns<'_>) -> Result<Vec<Self>, DataError> {
        let video_id = c.required::<UInt64Type>("video_id")?;
        let title = c.required_str("title")?;
        let category = c.required_str("category")?;
        let child_categories = c.string_lists("child_categories")?;
        let channel_id = c.required::<UInt64Type>("channel_id")?;
        let duration = c.required::<UInt32Type>("duration_seconds")?;
        let tags = c.string_lists("tags")?;
        let language = c.required_str("language")?;
        let upload_time = c.optional::<Int64Type>("upload_time");
        let views = c.required::<UInt64Type>("view_count")?;
        let likes = c.required::<UInt64Type>("like_count")?;
        let comments = c.required::<UInt64Type>("comment_count")?;
        let rating = c.required_str("content_rating")?;
        let regions = c.string_lists("regions")?;
        let mut rows = Vec::with_capacity(c.len());
        for (i, ((child_categories, tags), regions)) in child_categories
            .into_iter()
            .zip(tags)
            .zip(regions)
            .enumerate()
        {
            rows.push(Video {
                video_id: video_id.value(i),
                title: title.value(i).to_owned(),
                category: category.value(i).to_owned(),
                child_categories,
                channel_id: channel_id.value(i),
                duration_seconds: duration.value(i),
                tags,
                language: language.value(i).to_owned(),
                upload_time: (!upload_time.is_null(i)).then(|| upload_time.value(i)),
                view_count: views.value(i),
                like_count: likes.value(i),
                comment_count: comments.value(i),
                content_rating: c.parse::<ContentRating>(rating, i, "content_rating")?,
                regions,
            });
        }
        Ok(rows)
    }
}

impl Table for Channel {
    const FILE: &'static str = "channels.parquet";

    fn fields() -> Vec<Field> {
        vec![
            Field::new("channel_id", DataType::UInt64, false),
            Field::new("subscriber_count", DataType::UInt64, false),
        ]
    }

    fn columns(rows: &[Self]) -> Vec<ArrayRef> {
        vec![
            Arc::new(UInt64Array::from_iter_values(
                rows.iter().map(|c| c.channel_id),
            )),
            Arc::new(UInt64Array::from_iter_values(
                rows.iter().map(|c| c.subscriber_count),
            )),
        ]
    }

    fn rows(c: &Columns<'_>) -> Result<Vec<Self>, DataError> {
        let channel_id = c.required::<UInt64Type>("channel_id")?;
        let subscribers = c.required::<UInt64Type>("subscriber_count")?;
        Ok((0..c.len())
            .map(|i| Channel {
                channel_id: channel_id.value(i),
                subscriber_count: subscribers.value(i),
            })
            .collect())
    }
}

impl Table for Interaction {
    const FILE: &'static str = "interactions.parquet";

    fn fields() -> Vec<Field> {
        vec![
            Field::new("user_id", DataType::UInt64, false),
            Field::new("video_id", DataType::UInt64, false),
            Field::new("timestamp", DataType::Int64, false),
            Field::new("interaction_type", DataType::Utf8, false),
            Field::new("watch_seconds", DataType::UInt32, true),
            Field::new("device", DataType::Utf8, false),
        ]
    }

    fn columns(rows: &[Self]) -> Vec<ArrayRef> {
        vec![
            Arc::new(UInt64Array::from_iter_values(
                rows.iter().map(|i| i.user_id),
            )),
            Arc::new(UInt64Array::from_iter_values(
                rows.iter().map(|i| i.video_id),
            )),
            Arc::new(Int64Array::from_iter_values(
                rows.iter().map(|i| i.timestamp),
            )),
            strs(rows.iter().map(|i| i.interaction_type.as_str())),
            Arc::new(
                rows.iter()
                    .map(|i| i.watch_seconds)
                    .collect::<UInt32Array>(),
            ),
            strs(rows.iter().map(|i| i.device.as_str())),
        ]
    }

    fn rows(c: &Columns<'_>) -> Result<Vec<Self>, DataError> {
        let user_id = c.required::<UInt64Type>("user_id")?;
        let video_id = c.required::<UInt64Type>("video_id")?;
        let timestamp = c.required::<Int64Type>("timestamp")?;
        let kind = c.required_str("interaction_type")?;
        let watch = c.optional::<UInt32Type>("watch_seconds");
        let device = c.required_str("device")?;
        (0..c.len())
            .map(|i| {
                Ok(Interaction {
                    user_id: user_id.value(i),
                    video_id: video_id.value(i),
                    timestamp: timestamp.value(i),
                    interaction_type: c.parse::<InteractionType>(kind, i, "interaction_type")?,
                    watch_seconds: (!watch.is_null(i)).then(|| watch.value(i)),
                    device: device.value(i).to_owned(),
                })
            })
            .collect()
    }
}

/// Whether a column read from a file can stand for the expected one. List item names and
/// nullability differ between writers (`item`, `element`), so lists compare item types.
fn type_matches(found: &DataType, expected: &DataType) -> bool {
    match (found, expected) {
        (DataType::List(found), DataType::List(expected)) => {
            found.data_type() == expected.data_type()
        }
        _ => found == expected,
    }
}

/// Reads every row of a table file.
pub fn read_table<T: Table>(path: &Path) -> Result<Vec<T>, DataError> {
    let mut rows = Vec::new();
    for_each_batch::<T>(path, |batch| {
        rows.extend(batch);
        Ok(())
    })?;
    Ok(rows)
}

/// Streams a table file batch by batch, so callers can aggregate in bounded memory.
pub fn for_each_batch<T: Table>(
    path: &Path,
    mut consume: impl FnMut(Vec<T>) -> Result<(), DataError>,
) -> Result<(), DataError> {
    let file = File::open(path).map_err(|e| DataError::io(path, e))?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(|e| DataError::unreadable(path, e))?;
    let found = builder.schema().clone();
    for field in T::fields() {
        let Ok(column) = found.field_with_name(field.name()) else {
            return Err(DataError::MissingColumn {
                path: path.to_owned(),
                column: field.name().clone(),
            });
        };
        if !type_matches(column.data_type(), field.data_type()) {
            return Err(DataError::WrongType {
                path: path.to_owned(),
                column: field.name().clone(),
                found: column.data_type().to_string(),
                expected: field.data_type().to_string(),
            });
        }
    }
    let reader = builder
        .with_batch_size(ROWS_PER_BATCH)
        .build()
        .map_err(|e| DataError::unreadable(path, e))?;
    let mut first_row = 1;
    for batch in reader {
        let batch = batch.map_err(|e| DataError::unreadable(path, e))?;
        let columns = Columns {
            batch: &batch,
            path,
            first_row,
        };
        consume(T::rows(&columns)?)?;
        first_row += batch.num_rows() as u64;
    }
    Ok(())
}

/// Writes every row of a table file (atomically, see [`TableWriter`]).
pub fn write_table<T: Table>(path: &Path, rows: &[T]) -> Result<(), DataError> {
    let mut writer = TableWriter::<T>::create(path)?;
    for chunk in rows.chunks(ROWS_PER_BATCH) {
        writer.write_batch(chunk)?;
    }
    writer.finish().map(|_rows| ())
}

/// A streaming writer: rows are buffered up to one batch, then encoded. The file is
/// written under a temporary name and renamed into place by [`TableWriter::finish`], so
/// a crash or an error never leaves a half-written table under the real name.
pub struct TableWriter<T: Table> {
    /// `None` once finished; a writer dropped unfinished removes its temporary file.
    writer: Option<ArrowWriter<File>>,
    buffer: Vec<T>,
    temporary: PathBuf,
    path: PathBuf,
    rows: u64,
}

impl<T: Table> TableWriter<T> {
    /// Starts writing `path`.
    pub fn create(path: &Path) -> Result<Self, DataError> {
        let temporary = temporary_path(path);
        let file = File::create(&temporary).map_err(|e| DataError::io(&temporary, e))?;
        let properties = WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .set_max_row_group_row_count(Some(4 * ROWS_PER_BATCH))
            .build();
        let writer = ArrowWriter::try_new(file, T::schema(), Some(properties))
            .map_err(|e| DataError::unreadable(path, e))?;
        Ok(Self {
            writer: Some(writer),
            buffer: Vec::with_capacity(ROWS_PER_BATCH),
            temporary,
            path: path.to_owned(),
            rows: 0,
        })
    }

    /// Adds one row.
    pub fn push(&mut self, row: T) -> Result<(), DataError> {
        self.buffer.push(row);
        if self.buffer.len() >= ROWS_PER_BATCH {
            let rows = std::mem::take(&mut self.buffer);
            self.write_batch(&rows)?;
        }
        Ok(())
    }

    fn write_batch(&mut self, rows: &[T]) -> Result<(), DataError> {
        let batch = RecordBatch::try_new(T::schema(), T::columns(rows))
            .map_err(|e| DataError::unreadable(&self.path, e))?;
        self.writer
            .as_mut()
            .expect("only finish() takes the writer, and it consumes self")
            .write(&batch)
            .map_err(|e| DataError::unreadable(&self.path, e))?;
        self.rows += rows.len() as u64;
        Ok(())
    }

    /// Rows written so far (buffered ones included).
    pub fn rows(&self) -> u64 {
        self.rows + self.buffer.len() as u64
    }

    /// Flushes, closes and moves the file to its final name; returns the row count.
    pub fn finish(mut self) -> Result<u64, DataError> {
        let rows = std::mem::take(&mut self.buffer);
        if !rows.is_empty() {
            self.write_batch(&rows)?;
        }
        let writer = self.writer.take().expect("finish() runs once");
        let file = writer
            .into_inner()
            .map_err(|e| DataError::unreadable(&self.path, e))?;
        file.sync_all()
            .map_err(|e| DataError::io(&self.temporary, e))?;
        std::fs::rename(&self.temporary, &self.path).map_err(|e| DataError::io(&self.path, e))?;
        Ok(self.rows)
    }
}

impl<T: Table> Drop for TableWriter<T> {
    fn drop(&mut self) {
        if self.writer.is_some() {
            let _ = std::fs::remove_file(&self.temporary);
        }
    }
}

/// `dir/.name.tmp` beside `dir/name`: same file system, so the rename is atomic.
pub fn temporary_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp"))
}
