//! Progress bars for long runs (`indicatif`): connections opened against the target, and run
//! time against the planned time, with the last second's figures as the message.
//!
//! Shown only when stdout is a terminal and no `--json` report was asked for; otherwise the
//! coordinator's plain once-a-second lines go to stderr, as logs and CI want them.

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;

/// Redraws per second at most (indicatif's own default is 20).
pub const REDRAWS_PER_S: u8 = 4;

/// The bars of one run, or nothing when hidden.
pub struct Progress {
    bars: Option<(MultiProgress, ProgressBar, ProgressBar)>,
}

impl Progress {
    /// Bars for `target` connections and about `planned_s` seconds, if they should show.
    pub fn new(json: bool, target: u64, planned_s: u64) -> Progress {
        if json || !std::io::stdout().is_terminal() {
            return Progress { bars: None };
        }
        let multi =
            MultiProgress::with_draw_target(ProgressDrawTarget::stderr_with_hz(REDRAWS_PER_S));
        let style = |t: &str| {
            ProgressStyle::with_template(t)
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("█▉▊▋▌▍▎▏ ")
        };
        let conns = multi.add(ProgressBar::new(target.max(1)));
        conns.set_style(style(
            "{prefix:>8} {bar:32.cyan/blue} {pos}/{len} connected {msg}",
        ));
        conns.set_prefix("viewers");
        let time = multi.add(ProgressBar::new(planned_s.max(1)));
        time.set_style(style(
            "{prefix:>8} {bar:32.magenta/blue} {pos}/~{len} s {msg}",
        ));
        time.set_prefix("run");
        Progress {
            bars: Some((multi, conns, time)),
        }
    }

    pub fn visible(&self) -> bool {
        self.bars.is_some()
    }

    /// One second's update.
    pub fn update(&self, live: u64, failed: u64, elapsed_s: u64, phase: &str, figures: &str) {
        if let Some((_, conns, time)) = &self.bars {
            conns.set_position(live);
            conns.set_message(if failed > 0 {
                format!("({failed} failed)")
            } else {
                String::new()
            });
            if elapsed_s > time.length().unwrap_or(0) {
                time.set_length(elapsed_s);
            }
            time.set_position(elapsed_s);
            time.set_message(format!("{phase} | {figures}"));
        }
    }

    /// A line above the bars (or on stderr when there are none).
    pub fn println(&self, line: &str) {
        match &self.bars {
            Some((multi, _, _)) => {
                if multi.println(line).is_err() {
                    eprintln!("{line}");
                }
            }
            None => eprintln!("{line}"),
        }
    }

    /// Removes the bars, so the report prints on a clean screen.
    pub fn finish(&self) {
        if let Some((multi, conns, time)) = &self.bars {
            conns.finish_and_clear();
            time.finish_and_clear();
            let _ = multi.clear();
        }
    }
}
