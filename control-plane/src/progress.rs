//! Progress bars for long jobs: drawn on a terminal, silent elsewhere (CI logs stay clean;
//! the job still prints its summary when done).

use indicatif::{ProgressBar, ProgressStyle};

/// A bar counting `total` items of `unit` (e.g. "rows"), with rate and ETA.
pub fn bar(total: u64, label: &str, unit: &str) -> ProgressBar {
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template(&format!(
            "{{prefix:>12}} [{{bar:30}}] {{human_pos}}/{{human_len}} {unit} {{per_sec}} eta {{eta}}"
        ))
        .expect("the template is valid")
        .progress_chars("=> "),
    );
    bar.set_prefix(label.to_owned());
    bar
}
