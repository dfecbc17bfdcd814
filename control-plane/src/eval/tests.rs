use super::*;

struct Fixed(Vec<u64>);

impl Retriever for Fixed {
    fn name(&self) -> &str {
        "fixed"
    }

    fn recommend(&self, _: &EvalUser, k: usize) -> Vec<u64> {
        self.0.iter().copied().take(k).collect()
    }
}

fn set(relevant: Vec<u64>) -> EvalSet {
    EvalSet {
        users: vec![EvalUser {
            user_id: 1,
            history: vec![],
            relevant,
        }],
        catalogue: (0..200).collect(),
    }
}

#[test]
fn metrics_by_hand() {
    // Relevant {5, 7}; the list hits 5 at rank 1 (0-based) and 7 at rank 30.
    let mut ranked: Vec<u64> = (100..200).collect();
    ranked[1] = 5;
    ranked[30] = 7;
    let report = evaluate(&Fixed(ranked), &set(vec![5, 7]));
    assert_eq!(report.metric("recall@10"), 0.5);
    assert_eq!(report.metric("hit_rate@10"), 1.0);
    assert_eq!(report.metric("recall@50"), 1.0);
    let idcg = 1.0 + 1.0 / 3f64.log2();
    let ndcg10 = (1.0 / 3f64.log2()) / idcg;
    assert!((report.metric("ndcg@10") - ndcg10).abs() < 1e-12);
    let ndcg50 = (1.0 / 3f64.log2() + 1.0 / 32f64.log2()) / idcg;
    assert!((report.metric("ndcg@50") - ndcg50).abs() < 1e-12);
}

#[test]
fn recall_divides_by_the_reachable_count() {
    // 20 relevant videos, all of the top 10 hit: recall@10 is 1, not 0.5.
    let relevant: Vec<u64> = (0..20).collect();
    let report = evaluate(&Fixed((0..100).collect()), &set(relevant));
    assert_eq!(report.metric("recall@10"), 1.0);
    assert_eq!(report.metric("ndcg@10"), 1.0);
    assert_eq!(report.metric("recall@50"), 1.0);
}

#[test]
fn a_miss_scores_zero() {
    let report = evaluate(&Fixed((100..200).collect()), &set(vec![1]));
    for k in CUTOFFS {
        assert_eq!(report.metric(&format!("recall@{k}")), 0.0);
        assert_eq!(report.metric(&format!("ndcg@{k}")), 0.0);
    }
}

fn histories(pairs: &[(u64, &[u64])]) -> BTreeMap<u64, Vec<u64>> {
    pairs
        .iter()
        .map(|(user, videos)| (*user, videos.to_vec()))
        .collect()
}

#[test]
fn most_popular_skips_the_history() {
    let history = histories(&[(1, &[1, 2]), (2, &[2, 3]), (3, &[2, 3])]);
    let popular = MostPopular::fit(&history, &[1, 2, 3, 4]);
    let user = EvalUser {
        user_id: 9,
        history: vec![3],
        relevant: vec![4],
    };
    assert_eq!(popular.recommend(&user, 3), vec![2, 1, 4]);
}

#[test]
fn item_knn_follows_co_occurrence() {
    // 10 and 11 always go together; 12 goes with 13.
    let history = histories(&[
        (1, &[10, 11]),
        (2, &[10, 11]),
        (3, &[12, 13]),
        (4, &[12, 13, 11]),
        (5, &[13]),
    ]);
    let knn = ItemKnn::fit(&history, &[10, 11, 12, 13, 14], 10);
    let user = EvalUser {
        user_id: 9,
        history: vec![10],
        relevant: vec![11],
    };
    let ranked = knn.recommend(&user, 4);
    assert_eq!(ranked[0], 11);
    assert_eq!(ranked.len(), 4, "topped up by popularity");
    assert!(!ranked.contains(&10));
    let user = EvalUser {
        user_id: 9,
        history: vec![12],
        relevant: vec![13],
    };
    assert_eq!(knn.recommend(&user, 1), vec![13]);
}
