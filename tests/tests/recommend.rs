//! The recommend pipeline natively, on a bundle that the real command line trained and
//! built (`edgerec_e2e::synthetic_bundle`): what each stage promises, checked on its
//! output.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::OnceLock;

use edge::recommend::{Recommender, Request, Response};
use edgerec_e2e::{FIXTURE_PROMOTED, synthetic_bundle};

/// Unix seconds of every request (late 2026).
const NOW: i64 = 1_795_000_000;

fn recommender() -> &'static Recommender {
    static LOADED: OnceLock<Recommender> = OnceLock::new();
    LOADED.get_or_init(|| {
        let bytes = std::fs::read(&synthetic_bundle().bundle).unwrap();
        Recommender::from_bundle(&bytes).unwrap()
    })
}

/// A clock that advances 1 ms per reading, so responses are reproducible.
fn counting_clock() -> impl FnMut() -> f64 {
    let mut now = 0.0;
    move || {
        now += 1.0;
        now
    }
}

fn recommend(request: Request) -> Response {
    recommender()
        .recommend(request, &mut counting_clock())
        .unwrap()
}

/// The most common category of the catalogue and `count` of its videos, least viewed
/// first (so that they are not what popularity alone would return).
fn history_in_one_category(count: usize) -> (String, Vec<u64>) {
    let catalog = recommender().catalog();
    let mut by_category: BTreeMap<&str, Vec<(u64, u64)>> = BTreeMap::new();
    for video in catalog.iter() {
        by_category
            .entry(video.category())
            .or_default()
            .push((video.view_count(), video.video_id()));
    }
    let (category, mut videos) = by_category
        .into_iter()
        .max_by_key(|(_, v)| v.len())
        .unwrap();
    videos.sort_unstable();
    (
        category.to_owned(),
        videos.iter().take(count).map(|v| v.1).collect(),
    )
}

fn warm_request(user_id: u64) -> Request {
    let (_, history) = history_in_one_category(8);
    Request {
        user_id: Some(user_id),
        watch_history: history,
        ..Request::new(20, NOW)
    }
}

fn share_of(response: &Response, category: &str) -> f64 {
    let hits = response
        .recommendations
        .iter()
        .filter(|item| item.category == category)
        .count();
    hits as f64 / response.recommendations.len() as f64
}

#[test]
fn a_viewer_with_history_gets_personalized_ranked_results() {
    let (category, history) = history_in_one_category(8);
    let response = recommend(Request {
        user_id: Some(1),
        watch_history: history.clone(),
        ..Request::new(20, NOW)
    });
    let items = &response.recommendations;
    assert_eq!(items.len(), 20);
    let ids: BTreeSet<u64> = items.iter().map(|i| i.video_id).collect();
    assert_eq!(ids.len(), 20, "no video twice");
    assert!(
        history.iter().all(|id| !ids.contains(id)),
        "watched videos are excluded by default"
    );
    let sources: BTreeSet<&str> = items.iter().map(|i| i.source.as_str()).collect();
    assert!(sources.contains("personalized"), "{sources:?}");
    let meta = &response.metadata;
    assert!(!meta.cold_start);
    assert_eq!(meta.model_version, "fixture-1");
    assert!(
        meta.candidates_retrieved >= meta.candidates_after_filtering
            && meta.candidates_after_filtering >= 20,
        "{meta:?}"
    );
    assert!(
        meta.candidates_retrieved >= 60,
        "the main query alone asks for 60: {meta:?}"
    );
    assert_eq!(
        meta.stage_ms.tower, 1.0,
        "the caller's clock times each stage"
    );
    assert_eq!(meta.latency_ms, 5.0);

    // Personalization: the history's category is over-represented against the catalogue.
    let catalog = recommender().catalog();
    let catalogue_share =
        catalog.iter().filter(|v| v.category() == category).count() as f64 / catalog.len() as f64;
    let shown = share_of(&response, &category);
    assert!(
        shown >= 2.0 * catalogue_share,
        "{category}: {shown:.2} of the results vs {catalogue_share:.2} of the catalogue"
    );

    // Organic items are in score order (promoted slots aside).
    let organic: Vec<f64> = items
        .iter()
        .filter(|i| i.source != "promoted")
        .map(|i| i.score)
        .collect();
    let held_back = organic.windows(2).filter(|w| w[0] < w[1]).count();
    assert!(
        held_back <= 2,
        "only cap fill-ins may break score order: {organic:?}"
    );
}

#[test]
fn stated_category_preferences_get_their_own_queries() {
    let catalog = recommender().catalog();
    let (top, _) = history_in_one_category(1);
    let other = catalog
        .iter()
        .map(|v| v.category().to_owned())
        .find(|c| *c != top)
        .unwrap();
    let request = warm_request(2);
    let without = recommend(request.clone()).metadata.candidates_retrieved;
    let mut preferring = request;
    preferring.user_preferences.categories = vec![other.clone()];
    let with = recommend(preferring).metadata.candidates_retrieved;
    // The viewer's history is all `top`, so the main query finds little of `other`: its
    // query adds up to its quota of 30.
    assert!(
        with >= without + 15,
        "{other}: {without} candidates without the preference, {with} with it"
    );
}

#[test]
fn the_best_promoted_video_takes_its_slot() {
    let response = recommend(warm_request(3));
    let slot = &response.recommendations[2];
    assert_eq!(slot.source, "promoted");
    assert!(FIXTURE_PROMOTED.contains(&slot.video_id), "{slot:?}");
    assert_eq!(
        response
            .recommendations
            .iter()
            .filter(|i| i.source == "promoted")
            .count(),
        1,
        "one slot is configured"
    );
}

fn max_per_channel(response: &Response) -> usize {
    let mut counts: BTreeMap<u64, usize> = BTreeMap::new();
    for item in &response.recommendations {
        *counts.entry(item.channel_id).or_default() += 1;
    }
    counts.into_values().max().unwrap()
}

#[test]
fn experiment_arms_are_stable_balanced_and_change_the_rules() {
    let mut arms: BTreeMap<String, usize> = BTreeMap::new();
    for user in 0..200 {
        // 10 results from 400 videos of 20 channels: the caps never need relaxing.
        let request = Request {
            n: 10,
            ..warm_request(user)
        };
        let first = recommend(request.clone());
        let again = recommend(request);
        assert_eq!(first, again, "user {user}: same request, same answer");
        let meta = &first.metadata;
        assert_eq!(meta.experiment.as_deref(), Some("channel-cap"));
        let variant = meta.variant.clone().unwrap();
        let cap = if variant == "one-per-channel" { 1 } else { 2 };
        assert!(
            max_per_channel(&first) <= cap,
            "user {user} in {variant}: {:?}",
            first.recommendations
        );
        *arms.entry(variant).or_default() += 1;
    }
    assert_eq!(arms.len(), 2, "{arms:?}");
    assert!(
        arms.values().all(|&n| (70..=130).contains(&n)),
        "a 50/50 split of 200 users: {arms:?}"
    );
    let anonymous = recommend(Request {
        watch_history: warm_request(0).watch_history,
        ..Request::new(20, NOW)
    });
    assert_eq!(anonymous.metadata.experiment, None, "no id, no experiment");
}

#[test]
fn filters_hold_for_every_returned_video() {
    let catalog = recommender().catalog();
    let mut request = warm_request(4);
    let first = recommend(request.clone());
    let excluded: Vec<u64> = first.recommendations[..5]
        .iter()
        .map(|i| i.video_id)
        .collect();
    request.excluded_video_ids = excluded.clone();
    request.user_features.age = Some(10.0);
    let country = "US";
    request.user_features.country = Some(country.to_owned());
    let language = catalog.iter().next().unwrap().language().to_owned();
    request.user_preferences.languages = vec![language.clone()];
    let response = recommend(request.clone());
    assert!(!response.recommendations.is_empty());
    for item in &response.recommendations {
        let video = catalog.get(item.video_id).unwrap();
        assert!(!excluded.contains(&item.video_id), "{item:?} was excluded");
        assert!(
            video.content_rating().minimum_age() <= 10,
            "{item:?} is rated {:?}",
            video.content_rating()
        );
        assert!(video.available_in(country), "{item:?} not in {country}");
        assert_eq!(video.language(), language, "{item:?}");
    }

    // Watched videos come back only when the request says so. The history is what the
    // viewer was just shown, which retrieval finds again.
    request = warm_request(4);
    request.watch_history = first.recommendations[..8]
        .iter()
        .map(|i| i.video_id)
        .collect();
    let watched: BTreeSet<u64> = request.watch_history.iter().copied().collect();
    let shown = |response: &Response| {
        response
            .recommendations
            .iter()
            .filter(|i| watched.contains(&i.video_id))
            .count()
    };
    assert_eq!(shown(&recommend(request.clone())), 0);
    request.exclude_watched = Some(false);
    assert!(
        shown(&recommend(request)) > 0,
        "exclude_watched = false lets the history's videos compete"
    );
}

#[test]
fn cold_viewers_get_popular_videos_in_their_language_first() {
    let catalog = recommender().catalog();
    for user_id in [None, Some(987_654_321)] {
        let response = recommend(Request {
            user_id,
            ..Request::new(10, NOW)
        });
        assert!(response.metadata.cold_start, "{user_id:?}");
        assert_eq!(response.recommendations.len(), 10);
        let organic: Vec<_> = response
            .recommendations
            .iter()
            .filter(|i| i.source != "promoted")
            .collect();
        assert!(organic.iter().all(|i| i.source == "popular"), "{organic:?}");
        let views: Vec<u64> = organic
            .iter()
            .map(|i| catalog.get(i.video_id).unwrap().view_count())
            .collect();
        assert!(
            views.windows(2).all(|w| w[0] >= w[1]) || max_per_channel(&response) == 2,
            "most viewed first (caps aside): {views:?}"
        );
    }
    // A language that is not the most common one: its videos come first.
    let mut languages: BTreeMap<&str, usize> = BTreeMap::new();
    for video in catalog.iter() {
        *languages.entry(video.language()).or_default() += 1;
    }
    let rare = languages
        .iter()
        .min_by_key(|(_, n)| **n)
        .map(|(l, _)| l.to_string())
        .unwrap();
    let mut request = Request::new(5, NOW);
    request.user_features.language = Some(rare.clone());
    let response = recommend(request);
    let first = &response.recommendations[0];
    assert_eq!(catalog.get(first.video_id).unwrap().language(), rare);
}

#[test]
fn unknown_and_strange_ids_are_served_not_refused() {
    let mut request = warm_request(5);
    request.watch_history.extend([u64::MAX, 0, 1 << 40]);
    request.excluded_video_ids = vec![u64::MAX, 123_456_789];
    let response = recommend(request);
    assert_eq!(response.recommendations.len(), 20);
}

fn refusal(request: Request) -> String {
    let error = recommender()
        .recommend(request, &mut counting_clock())
        .unwrap_err();
    assert_eq!(error.code(), "invalid_request", "{error}");
    error.to_string()
}

#[test]
fn bad_requests_are_refused_with_the_field_named() {
    for n in [0, 201, 1_000_000] {
        let message = refusal(Request::new(n, NOW));
        assert!(
            message.contains("`n`") && message.contains("between 1 and 200"),
            "{message}"
        );
    }
    for age in [f64::NAN, -1.0, 151.0, f64::INFINITY] {
        let mut request = Request::new(5, NOW);
        request.user_features.age = Some(age);
        let message = refusal(request);
        assert!(message.contains("user_features.age"), "{message}");
    }
    let mut request = Request::new(5, NOW);
    request.watch_history = (0..100_000).collect();
    let message = refusal(request);
    assert!(
        message.contains("watch_history") && message.contains("100000 ids"),
        "{message}"
    );
    let mut request = Request::new(5, NOW);
    request.user_features.country = Some("x".repeat(10_000));
    assert!(refusal(request).contains("user_features.country"));

    let error = Request::from_msgpack(b"\x92\xc1").unwrap_err();
    assert_eq!(error.code(), "invalid_request");
    let mut unknown = BTreeMap::new();
    unknown.insert("timestamp", NOW);
    unknown.insert("surprise", 1);
    let bytes = rmp_serde_like_map(&unknown);
    let message = Request::from_msgpack(&bytes).unwrap_err().to_string();
    assert!(message.contains("surprise"), "{message}");
}

/// MessagePack of a map of small non-negative integers (enough for the unknown-field test
/// without another dependency).
fn rmp_serde_like_map(map: &BTreeMap<&str, i64>) -> Vec<u8> {
    let mut out = vec![0x80 | map.len() as u8];
    for (key, value) in map {
        out.push(0xa0 | key.len() as u8);
        out.extend_from_slice(key.as_bytes());
        out.push(0xd3);
        out.extend_from_slice(&value.to_be_bytes());
    }
    out
}

#[test]
fn stage_by_stage_equals_all_at_once() {
    let request = warm_request(6);
    let rec = recommender();
    let mut run = rec.start(request.clone()).unwrap();
    let mut stages = Vec::new();
    while let Some(stage) = run.next_stage() {
        stages.push(stage.name());
        run.run_stage(rec).unwrap();
    }
    assert_eq!(
        stages,
        ["tower", "retrieval", "filtering", "ranking", "ordering"]
    );
    let stepped = run.finish(rec, edge::recommend::StageMs::from_array([1.0; 5]));
    assert_eq!(stepped, recommend(request));
}

#[test]
fn a_damaged_bundle_is_refused_with_the_section_named() {
    let bytes = std::fs::read(&synthetic_bundle().bundle).unwrap();
    let error = Recommender::from_bundle(&bytes[..bytes.len() / 2]).unwrap_err();
    assert_eq!(error.code(), "invalid_bundle");
    assert!(error.to_string().contains("section"), "{error}");
    let mut flipped = bytes.clone();
    let at = flipped.len() - 10;
    flipped[at] ^= 0x40;
    let error = Recommender::from_bundle(&flipped).unwrap_err();
    assert!(error.to_string().contains("section `"), "{error}");
}
