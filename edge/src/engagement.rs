//! The seed's positive-interaction rules: one function that turns an interaction into a
//! label weight. Two-tower training, ranker rows, evaluation and online metrics all call
//! [`engagement_weight`], so "positive" means the same thing everywhere.

use serde::{Deserialize, Serialize};

use crate::ConfigError;
use crate::entities::InteractionType;

/// The weights of the seed's rules, and the watch ratio above which a watch counts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EngagementRules {
    /// Weight of a like, comment or share.
    pub strong: f32,
    /// Weight of a click.
    pub click: f32,
    /// Weight of a watch of more than `min_watch_ratio` of the duration.
    pub watch: f32,
    /// Weight of an impression, or of a watch too short to count.
    pub impression: f32,
    /// Fraction of the duration that a watch must exceed to count as engagement.
    pub min_watch_ratio: f32,
}

impl Default for EngagementRules {
    fn default() -> Self {
        Self {
            strong: 1.0,
            click: 0.8,
            watch: 0.7,
            impression: 0.3,
            min_watch_ratio: 0.4,
        }
    }
}

impl EngagementRules {
    /// Checks that the weights are ordered as the rules mean them to be.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let weights = [
            ("strong", self.strong),
            ("click", self.click),
            ("watch", self.watch),
            ("impression", self.impression),
        ];
        for (key, weight) in weights {
            if !(0.0..=1.0).contains(&weight) {
                return Err(ConfigError::new(
                    key,
                    format!("must be in [0, 1], got {weight}"),
                ));
            }
        }
        if self.impression >= self.watch.min(self.click).min(self.strong) {
            return Err(ConfigError::new(
                "impression",
                "must be below the click, watch and strong weights, or no interaction is positive",
            ));
        }
        if !(0.0..1.0).contains(&self.min_watch_ratio) {
            return Err(ConfigError::new(
                "min_watch_ratio",
                format!("must be in [0, 1), got {}", self.min_watch_ratio),
            ));
        }
        Ok(())
    }

    /// Whether a weight returned by [`engagement_weight`] marks a positive example.
    pub fn is_positive(&self, weight: f32) -> bool {
        weight > self.impression
    }
}

/// The label weight of one interaction.
///
/// A watch counts when it exceeds `min_watch_ratio` of `duration_seconds`. When the
/// source records a watch but not how long (`watch_seconds` is `None`, as for a rating),
/// or does not know the video's length (`duration_seconds` is 0), the watch counts if it
/// lasted at all: the source said it was watched. Likes, comments and shares imply a view
/// and weigh the most.
pub fn engagement_weight(
    rules: &EngagementRules,
    kind: InteractionType,
    watch_seconds: Option<u32>,
    duration_seconds: u32,
) -> f32 {
    match kind {
        InteractionType::Like | InteractionType::Comment | InteractionType::Share => rules.strong,
        InteractionType::Click => rules.click,
        InteractionType::Watch => {
            let counts = match watch_seconds {
                None => true,
                Some(watched) if duration_seconds == 0 => watched > 0,
                Some(watched) => watched as f32 > rules.min_watch_ratio * duration_seconds as f32,
            };
            if counts {
                rules.watch
            } else {
                rules.impression
            }
        }
        InteractionType::Impression => rules.impression,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weight(kind: InteractionType, watched: Option<u32>, duration: u32) -> f32 {
        engagement_weight(&EngagementRules::default(), kind, watched, duration)
    }

    #[test]
    fn the_seed_rules() {
        assert_eq!(weight(InteractionType::Like, None, 100), 1.0);
        assert_eq!(weight(InteractionType::Comment, None, 100), 1.0);
        assert_eq!(weight(InteractionType::Share, None, 100), 1.0);
        assert_eq!(weight(InteractionType::Click, None, 100), 0.8);
        assert_eq!(weight(InteractionType::Watch, Some(41), 100), 0.7);
        assert_eq!(weight(InteractionType::Impression, None, 100), 0.3);
    }

    #[test]
    fn watch_must_exceed_the_ratio() {
        assert_eq!(weight(InteractionType::Watch, Some(40), 100), 0.3);
        assert_eq!(weight(InteractionType::Watch, Some(0), 100), 0.3);
        assert_eq!(
            weight(InteractionType::Watch, None, 100),
            0.7,
            "watched, length unknown"
        );
        assert_eq!(weight(InteractionType::Watch, Some(1), 0), 0.7);
        assert_eq!(weight(InteractionType::Watch, Some(0), 0), 0.3);
    }

    #[test]
    fn positive_means_above_an_impression() {
        let rules = EngagementRules::default();
        assert!(rules.is_positive(0.7));
        assert!(!rules.is_positive(0.3));
    }

    #[test]
    fn validation_names_the_key() {
        let rules = EngagementRules {
            min_watch_ratio: 1.5,
            ..EngagementRules::default()
        };
        assert_eq!(rules.validate().unwrap_err().key, "min_watch_ratio");
        let rules = EngagementRules {
            impression: 0.9,
            ..EngagementRules::default()
        };
        assert_eq!(rules.validate().unwrap_err().key, "impression");
    }
}
