//! Each section decoder on arbitrary bytes, past the bundle's checksums (which stop most
//! of `load_bundle`'s mutations before any decoder runs). The first byte picks the
//! decoder, in `SectionKind::ALL` order; the corpus starts from a real bundle's sections.
//! A clear error or a decoded section, never a panic.
#![no_main]

use edge::bundle::SectionKind;
use edge::catalog::Catalog;
use edge::preprocess::Preprocessor;
use edge::ranker::RankerModel;
use edge::rules::{BusinessRules, Experiments};
use edge::shard::Shard;
use edge::tower::{TowerTables, UserTower, UserTowerSpec};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    let Some((&selector, bytes)) = input.split_first() else {
        return;
    };
    let kind = SectionKind::ALL[usize::from(selector) % SectionKind::ALL.len()];
    match kind {
        SectionKind::UserTower => {
            let spec = UserTowerSpec {
                history_length: 50,
                recency_decay: 0.9,
                output_dim: 64,
            };
            let _ = UserTower::load(bytes, spec);
        }
        SectionKind::TowerTables => drop(TowerTables::from_section(bytes.to_vec().into())),
        SectionKind::TowerSpec => drop(UserTowerSpec::from_bytes(bytes)),
        SectionKind::Shard => {
            // Without the checksum, as the serving path opens a bundle's shard: the
            // structural checks alone must stand between any bytes and a panic.
            if let Ok(shard) = Shard::open_verified(bytes.to_vec().into()) {
                // An opened shard must search without failing.
                let query = vec![0.5; shard.dim()];
                shard
                    .nns(10)
                    .search(&query)
                    .expect("a valid query searches");
            }
        }
        SectionKind::Ranker => drop(RankerModel::from_bundle_section(bytes)),
        SectionKind::Preprocessor => drop(Preprocessor::from_bytes(bytes)),
        SectionKind::Videos => {
            if let Ok(catalog) = Catalog::from_bytes(bytes) {
                // Every accessor of every row must answer.
                for video in catalog.iter() {
                    let _ = (video.title(), video.category(), video.child_categories());
                    let _ = (video.language(), video.available_in("US"), video.promoted());
                    let _ = (video.channel_subscribers(), video.upload_time());
                }
            }
        }
        SectionKind::Rules => drop(BusinessRules::from_bytes(bytes)),
        SectionKind::Experiments => drop(Experiments::from_bytes(bytes)),
    }
});
