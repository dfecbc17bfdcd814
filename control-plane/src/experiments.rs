//! A/B analysis from the collected outcomes (the seed's A/B framework): per arm,
//! responses, impressions (items shown), clicks and watches (distinct videos of a
//! response clicked or watched, joined to the response by request id), CTR and watch
//! rate; per treatment arm against the control, the lift, the difference with a 95%
//! confidence interval and the two-sided p-value of a two-proportion z-test. Arms with
//! fewer impressions than the minimum sample get a warning instead of a verdict.
//!
//! The arms come from what served: the module assigns viewers by a salted hash of their
//! id into the split the bundle defines, and every captured response names its
//! experiment and variant; the same outcomes grouped by model version are the online
//! metrics of each model.

use serde::{Deserialize, Serialize};

/// What one arm (or model version) served and what viewers did with it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ArmOutcome {
    /// The variant (or model version).
    pub arm: String,
    /// Responses served.
    pub responses: u64,
    /// Items shown.
    pub impressions: u64,
    /// Shown items clicked.
    pub clicks: u64,
    /// Shown items watched.
    pub watches: u64,
}

impl ArmOutcome {
    /// Clicks per impression.
    pub fn ctr(&self) -> f64 {
        ratio(self.clicks, self.impressions)
    }

    /// Watches per impression.
    pub fn watch_rate(&self) -> f64 {
        ratio(self.watches, self.impressions)
    }
}

fn ratio(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 / whole as f64
    }
}

/// A treatment's rate against the control's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Comparison {
    /// `ctr` or `watch_rate`.
    pub metric: String,
    /// The control's rate.
    pub control: f64,
    /// The treatment's rate.
    pub treatment: f64,
    /// Treatment minus control.
    pub difference: f64,
    /// Relative change, `None` when the control's rate is 0.
    pub lift: Option<f64>,
    /// 95% confidence interval of the difference (unpooled standard error).
    #[schema(value_type = Vec<f64>)]
    pub ci95: (f64, f64),
    /// The z statistic (pooled standard error).
    pub z: f64,
    /// Two-sided p-value.
    pub p_value: f64,
}

/// The two-proportion z-test of `treatment_successes / treatment_n` against
/// `control_successes / control_n`.
pub fn two_proportion_test(
    metric: &str,
    treatment_successes: u64,
    treatment_n: u64,
    control_successes: u64,
    control_n: u64,
) -> Comparison {
    let treatment = ratio(treatment_successes, treatment_n);
    let control = ratio(control_successes, control_n);
    let difference = treatment - control;
    let (nt, nc) = (treatment_n.max(1) as f64, control_n.max(1) as f64);
    let pooled = ratio(
        treatment_successes + control_successes,
        treatment_n + control_n,
    );
    let pooled_se = (pooled * (1.0 - pooled) * (1.0 / nt + 1.0 / nc)).sqrt();
    let z = if pooled_se > 0.0 {
        difference / pooled_se
    } else {
        0.0
    };
    // Two-sided: P(|Z| > |z|) = erfc(|z| / sqrt 2).
    let p_value = libm::erfc(z.abs() / std::f64::consts::SQRT_2);
    let se = (treatment * (1.0 - treatment) / nt + control * (1.0 - control) / nc).sqrt();
    const Z_975: f64 = 1.959_963_984_540_054;
    Comparison {
        metric: metric.to_owned(),
        control,
        treatment,
        difference,
        lift: (control > 0.0).then(|| difference / control),
        ci95: (difference - Z_975 * se, difference + Z_975 * se),
        z,
        p_value,
    }
}

/// One arm in an analysis.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ArmReport {
    /// What it served and got.
    #[serde(flatten)]
    pub outcome: ArmOutcome,
    /// Clicks per impression.
    pub ctr: f64,
    /// Watches per impression.
    pub watch_rate: f64,
    /// Against the control (empty for the control itself).
    pub versus_control: Vec<Comparison>,
}

/// An experiment's analysis.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Analysis {
    /// The experiment.
    pub experiment: String,
    /// The arm the others are compared with.
    pub control: Option<String>,
    /// Impressions an arm needs before its comparison means much.
    pub min_sample: u64,
    /// The arms, control first.
    pub arms: Vec<ArmReport>,
    /// Too little data, a missing control, ...
    pub warnings: Vec<String>,
}

/// Compares every arm with the control: the arm named `control` when given, else one
/// named "control", else the first by name.
pub fn analyze(
    experiment: &str,
    mut outcomes: Vec<ArmOutcome>,
    control: Option<&str>,
    min_sample: u64,
) -> Analysis {
    outcomes.sort_by(|a, b| a.arm.cmp(&b.arm));
    let mut warnings = Vec::new();
    let control_name = match control {
        Some(name) => {
            if !outcomes.iter().any(|o| o.arm == name) {
                warnings.push(format!("no outcomes for the control arm {name:?}"));
            }
            Some(name.to_owned())
        }
        None => outcomes
            .iter()
            .find(|o| o.arm == "control")
            .or(outcomes.first())
            .map(|o| o.arm.clone()),
    };
    if outcomes.is_empty() {
        warnings.push(format!(
            "no served responses name experiment {experiment:?} yet"
        ));
    }
    if let Some(name) = &control_name
        && let Some(position) = outcomes.iter().position(|o| &o.arm == name)
    {
        let arm = outcomes.remove(position);
        outcomes.insert(0, arm);
    }
    let control_outcome = outcomes
        .first()
        .filter(|o| Some(&o.arm) == control_name.as_ref())
        .cloned();
    for outcome in &outcomes {
        if outcome.impressions < min_sample {
            warnings.push(format!(
                "arm {:?} has {} impressions, below the minimum sample of {min_sample}: its comparison is not conclusive",
                outcome.arm, outcome.impressions
            ));
        }
    }
    let arms = outcomes
        .into_iter()
        .map(|outcome| {
            let versus_control = match &control_outcome {
                Some(control) if control.arm != outcome.arm => vec![
                    two_proportion_test(
                        "ctr",
                        outcome.clicks,
                        outcome.impressions,
                        control.clicks,
                        control.impressions,
                    ),
                    two_proportion_test(
                        "watch_rate",
                        outcome.watches,
                        outcome.impressions,
                        control.watches,
                        control.impressions,
                    ),
                ],
                _ => Vec::new(),
            };
            ArmReport {
                ctr: outcome.ctr(),
                watch_rate: outcome.watch_rate(),
                outcome,
                versus_control,
            }
        })
        .collect();
    Analysis {
        experiment: experiment.to_owned(),
        control: control_name,
        min_sample,
        arms,
        warnings,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_z_test_matches_the_textbook() {
        // 250/1000 against 200/1000: pooled p 0.225, z = 0.05 / 0.018675 = 2.6774,
        // two-sided p = 0.00742 (statsmodels' proportions_ztest gives the same).
        let test = two_proportion_test("ctr", 250, 1000, 200, 1000);
        assert!((test.z - 2.6774).abs() < 1e-3, "{test:?}");
        assert!((test.p_value - 0.00742).abs() < 1e-4, "{test:?}");
        assert!((test.lift.unwrap() - 0.25).abs() < 1e-12);
        // Unpooled SE sqrt(.25*.75/1000 + .2*.8/1000) = 0.018641.
        assert!(
            (test.ci95.0 - (0.05 - 1.96 * 0.018641)).abs() < 1e-4,
            "{test:?}"
        );
        assert!(
            (test.ci95.1 - (0.05 + 1.96 * 0.018641)).abs() < 1e-4,
            "{test:?}"
        );
        let same = two_proportion_test("ctr", 10, 100, 10, 100);
        assert_eq!((same.z, same.p_value), (0.0, 1.0));
        let empty = two_proportion_test("ctr", 0, 0, 0, 0);
        assert!(empty.p_value.is_finite() && empty.lift.is_none());
    }

    fn arm(name: &str, impressions: u64, clicks: u64) -> ArmOutcome {
        ArmOutcome {
            arm: name.to_owned(),
            responses: impressions / 10,
            impressions,
            clicks,
            watches: clicks / 2,
        }
    }

    #[test]
    fn the_control_comes_first_and_small_arms_are_flagged() {
        let analysis = analyze(
            "e",
            vec![
                arm("b", 5000, 600),
                arm("control", 5000, 500),
                arm("a", 50, 9),
            ],
            None,
            1000,
        );
        assert_eq!(analysis.control.as_deref(), Some("control"));
        let names: Vec<&str> = analysis
            .arms
            .iter()
            .map(|a| a.outcome.arm.as_str())
            .collect();
        assert_eq!(names, ["control", "a", "b"]);
        assert!(analysis.arms[0].versus_control.is_empty());
        assert_eq!(analysis.arms[2].versus_control[0].metric, "ctr");
        assert!(analysis.arms[2].versus_control[0].p_value < 0.01);
        assert_eq!(analysis.warnings.len(), 1, "{:?}", analysis.warnings);
        assert!(analysis.warnings[0].contains("\"a\""));
        let named = analyze("e", vec![arm("x", 10, 1), arm("y", 10, 2)], Some("y"), 1);
        assert_eq!(named.arms[0].outcome.arm, "y");
        let missing = analyze("e", vec![arm("x", 10, 1)], Some("zzz"), 1);
        assert!(missing.warnings[0].contains("zzz"));
        assert!(missing.arms[0].versus_control.is_empty());
    }
}
