use super::*;

fn video(video_id: u64, category: &str, regions: &[&str]) -> Video {
    Video {
        video_id,
        title: format!("video {video_id}"),
        category: category.into(),
        child_categories: vec![format!("{category}/a"), "x".into()],
        channel_id: video_id % 3,
        duration_seconds: 60 * video_id as u32,
        tags: vec!["ignored".into()],
        language: if video_id.is_multiple_of(2) {
            "en"
        } else {
            "de"
        }
        .into(),
        upload_time: (video_id != 5).then_some(1_700_000_000 + video_id as i64),
        view_count: 1000 + video_id,
        like_count: 10 + video_id,
        comment_count: video_id,
        content_rating: if video_id == 4 {
            ContentRating::Restricted
        } else {
            ContentRating::General
        },
        regions: regions.iter().map(|r| r.to_string()).collect(),
    }
}

fn sample() -> (Vec<Video>, Catalog) {
    let videos = vec![
        video(9, "music", &[]),
        video(4, "news", &["US", "CA"]),
        video(5, "music", &["DE"]),
        video(7, "sport", &[]),
    ];
    let channels = [
        Channel {
            channel_id: 1,
            subscriber_count: 500,
        },
        Channel {
            channel_id: 0,
            subscriber_count: 20,
        },
    ];
    let catalog = Catalog::build(&videos, &channels, &[7, 99]).unwrap();
    (videos, catalog)
}

#[test]
fn every_fact_of_a_video_reads_back_through_the_bytes() {
    let (videos, built) = sample();
    let catalog = Catalog::from_bytes(&built.to_bytes()).unwrap();
    assert_eq!(catalog, built);
    assert_eq!(catalog.len(), 4);
    assert_eq!(
        catalog.iter().map(|v| v.video_id()).collect::<Vec<_>>(),
        [4, 5, 7, 9],
        "rows in id order"
    );
    for original in &videos {
        let v = catalog.get(original.video_id).unwrap();
        assert_eq!(v.title(), original.title);
        assert_eq!(v.category(), original.category);
        assert_eq!(v.child_categories(), original.child_categories.join("|"));
        assert_eq!(v.channel_id(), original.channel_id);
        assert_eq!(v.language(), original.language);
        assert_eq!(v.duration_seconds(), original.duration_seconds);
        assert_eq!(v.view_count(), original.view_count);
        assert_eq!(v.like_count(), original.like_count);
        assert_eq!(v.comment_count(), original.comment_count);
        assert_eq!(v.upload_time(), original.upload_time);
        assert_eq!(v.content_rating(), original.content_rating);
        assert_eq!(v.promoted(), original.video_id == 7);
        assert_eq!(catalog.at(v.row()).unwrap().video_id(), original.video_id);
    }
    assert!(catalog.get(8).is_none() && catalog.at(4).is_none());
    let news = catalog.get(4).unwrap();
    assert!(news.available_in("CA") && !news.available_in("DE"));
    assert!(
        catalog.get(9).unwrap().available_in("DE"),
        "no regions: everywhere"
    );
    assert_eq!(catalog.get(4).unwrap().channel_subscribers(), 500);
    assert_eq!(catalog.get(9).unwrap().channel_subscribers(), 20);
    assert_eq!(
        catalog.get(5).unwrap().channel_subscribers(),
        0,
        "unknown channel"
    );
}

#[test]
fn duplicates_and_broken_columns_are_refused_with_the_column_named() {
    let (mut videos, _) = sample();
    videos.push(video(5, "again", &[]));
    assert_eq!(
        Catalog::build(&videos, &[], &[]).unwrap_err().to_string(),
        "invalid bundle: section `videos` is invalid: video id 5 appears twice"
    );

    let (_, catalog) = sample();
    let mut short = catalog.clone();
    short.view_count.pop();
    assert!(
        Catalog::from_bytes(&short.to_bytes())
            .unwrap_err()
            .to_string()
            .contains("column `view_count` has 3 rows, `ids` has 4")
    );
    let mut unsorted = catalog.clone();
    unsorted.ids.swap(0, 1);
    assert!(
        Catalog::from_bytes(&unsorted.to_bytes())
            .unwrap_err()
            .to_string()
            .contains("`ids` is not strictly ascending")
    );
    let mut dangling = catalog.clone();
    dangling.category[2] = 1000;
    assert!(
        Catalog::from_bytes(&dangling.to_bytes())
            .unwrap_err()
            .to_string()
            .contains("column `category`, row 2")
    );
    let mut spelled_twice = catalog.clone();
    let first = spelled_twice.strings[0].clone();
    spelled_twice.strings.push(first);
    assert!(
        Catalog::from_bytes(&spelled_twice.to_bytes())
            .unwrap_err()
            .to_string()
            .contains("column `strings` spells")
    );
    let mut regions = catalog.clone();
    regions.region_offsets[1] = 100;
    assert!(
        Catalog::from_bytes(&regions.to_bytes())
            .unwrap_err()
            .to_string()
            .contains("region_offsets")
    );
    let mut newer = catalog.clone();
    newer.format_version = CATALOG_FORMAT_VERSION + 1;
    assert_eq!(
        Catalog::from_bytes(&newer.to_bytes())
            .unwrap_err()
            .to_string(),
        format!(
            "videos section has format version {}, this build reads version {CATALOG_FORMAT_VERSION}",
            CATALOG_FORMAT_VERSION + 1
        )
    );
    let mut cut_title = catalog.clone();
    cut_title.title_ends[1] = cut_title.title_ends[0] - 1;
    assert!(
        Catalog::from_bytes(&cut_title.to_bytes())
            .unwrap_err()
            .to_string()
            .contains("column `title_ends`, row 1")
    );
    // "video 4" ends at byte 7; a two-byte character at byte 6 puts that end inside it.
    let mut multibyte = catalog.clone();
    multibyte.title_text.insert(6, 'é');
    assert!(
        Catalog::from_bytes(&multibyte.to_bytes())
            .unwrap_err()
            .to_string()
            .contains("column `title_ends`, row 0")
    );
    // A rating or flag byte that is no value is named, with its row.
    let mut bytes = catalog.to_bytes();
    let key = b"content_rating";
    let at = bytes.windows(key.len()).position(|w| w == key).unwrap() + key.len();
    assert_eq!(bytes[at], 0xc4, "a bin 8 marker");
    bytes[at + 2] = 9;
    let error = Catalog::from_bytes(&bytes).unwrap_err().to_string();
    assert!(error.contains("row 0 holds no valid value"), "{error}");
    let bytes = catalog.to_bytes();
    for cut in [0, 1, bytes.len() / 2, bytes.len() - 1] {
        assert!(Catalog::from_bytes(&bytes[..cut]).is_err(), "cut {cut}");
    }
}

#[test]
fn the_popularity_order_is_stored_checked_and_worked_out_for_version_2() {
    let (mut videos, _) = sample();
    // A tie on views, broken by id.
    videos[3].view_count = videos[0].view_count;
    let catalog = Catalog::build(&videos, &[], &[]).unwrap();
    let ranked: Vec<u64> = catalog
        .popularity_order()
        .iter()
        .map(|&row| catalog.at(row as usize).unwrap().video_id())
        .collect();
    assert_eq!(ranked, [7, 9, 5, 4], "views 1009 (ids 7, 9), 1005, 1004");
    let reread = Catalog::from_bytes(&catalog.to_bytes()).unwrap();
    assert_eq!(reread.popularity_order(), catalog.popularity_order());

    let mut version_2 = catalog.clone();
    version_2.format_version = 2;
    version_2.popularity_order.clear();
    let upgraded = Catalog::from_bytes(&version_2.to_bytes()).unwrap();
    assert_eq!(upgraded, catalog, "version 2 loads as version 3 would");

    let refused = |broken: Catalog| {
        Catalog::from_bytes(&broken.to_bytes())
            .unwrap_err()
            .to_string()
    };
    let mut swapped = catalog.clone();
    swapped.popularity_order.swap(0, 1);
    assert!(refused(swapped).contains("out of order"));
    let mut repeated = catalog.clone();
    repeated.popularity_order[1] = repeated.popularity_order[0];
    assert!(refused(repeated).contains("out of order"));
    let mut past_end = catalog.clone();
    past_end.popularity_order[3] = 4;
    assert!(refused(past_end).contains("past the end"));
    let mut short = catalog.clone();
    short.popularity_order.pop();
    assert!(refused(short).contains("has 3 rows"));
    let mut stale = catalog.clone();
    stale.format_version = 2;
    assert!(refused(stale).contains("version 2 has no column"));
}
