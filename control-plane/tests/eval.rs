//! Retrieval baselines on MovieLens-100k (from `EDGEREC_ML100K`, set by `cargo xtask
//! test`): the floors any learned retriever must clear, pinned so a regression in the
//! metrics or the split shows up here first.

mod common;

use control_plane::eval::{EvalSet, ItemKnn, MostPopular, Part, evaluate, training_histories};

#[test]
fn movielens_baselines_leave_last_one_out() {
    let common::Prepared {
        dataset,
        rules,
        parts,
        ..
    } = common::movielens();
    let set = EvalSet::new(&parts, &dataset.videos, &rules, Part::Test);
    assert_eq!(set.users.len(), 943, "every user has a held-out positive");
    assert_eq!(set.catalogue.len(), 1682);
    assert!(set.users.iter().all(|u| u.relevant.len() == 1));

    let histories = training_histories(&parts, &dataset.videos, &rules, Part::Test);
    let popular = evaluate(&MostPopular::fit(&histories, &set.catalogue), &set);
    let knn = evaluate(&ItemKnn::fit(&histories, &set.catalogue, 100), &set);
    let (popular50, knn50) = (popular.metric("recall@50"), knn.metric("recall@50"));
    assert!(
        (0.18..0.25).contains(&popular50),
        "most-popular recall@50 {popular50}"
    );
    assert!(knn50 > 0.27, "item-knn recall@50 {knn50}");
    assert!(
        knn50 > popular50 * 1.2,
        "item-knn {knn50} vs most-popular {popular50}"
    );
    for report in [&popular, &knn] {
        for k in [10, 20, 50] {
            let next = match k {
                10 => 20,
                20 => 50,
                _ => 100,
            };
            assert!(
                report.metric(&format!("recall@{k}")) <= report.metric(&format!("recall@{next}"))
            );
        }
    }
}

#[test]
fn a_capped_evaluation_keeps_a_seeded_sample_in_user_order() {
    let common::Prepared {
        dataset,
        rules,
        parts,
        ..
    } = common::movielens();
    let full = EvalSet::new(&parts, &dataset.videos, &rules, Part::Test);
    assert_eq!(
        full.clone().at_most(943, 1),
        full,
        "under the cap: all users"
    );

    let sample = full.clone().at_most(200, 7);
    assert_eq!(sample.users.len(), 200);
    assert_eq!(sample.catalogue, full.catalogue);
    assert!(sample.users.windows(2).all(|w| w[0].user_id < w[1].user_id));
    assert!(sample.users.iter().all(|u| full.users.contains(u)));
    assert_eq!(
        sample,
        full.clone().at_most(200, 7),
        "same seed, same users"
    );
    assert_ne!(sample, full.at_most(200, 8), "another seed, other users");
}
