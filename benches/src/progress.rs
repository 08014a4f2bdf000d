//! Progress of a long run, on stderr (stdout is kept for the final table): a bar of the passes
//! with one line per step above it on a terminal (indicatif), one JSON object per line otherwise
//! (CI logs, scripts).

use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Value, json};
use std::io::IsTerminal;
use std::time::Instant;

pub struct Progress {
    /// The terminal's bar; `None` when stderr is not a terminal.
    bar: Option<ProgressBar>,
    start: Instant,
    done: usize,
    total: usize,
}

impl Progress {
    pub fn new() -> Progress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let style = ProgressStyle::with_template("{elapsed:>6} [{bar:30}] {pos}/{len} passes")
                .expect("a valid template")
                .progress_chars("## ");
            ProgressBar::new(0).with_style(style)
        });
        Progress {
            bar,
            start: Instant::now(),
            done: 0,
            total: 0,
        }
    }

    /// Sets the number of passes to come.
    pub fn expect(&mut self, total: usize) {
        self.total = total;
        if let Some(bar) = &self.bar {
            bar.set_length(total as u64);
        }
    }

    /// A setup or teardown step.
    pub fn note(&self, message: &str) {
        self.emit(message, json!({ "event": "note", "message": message }));
    }

    /// A pass has ended; `fields` describe it for the JSON form.
    pub fn pass(&mut self, message: &str, fields: Value) {
        self.done += 1;
        let mut event = json!({ "event": "pass", "step": self.done, "total": self.total });
        if let (Value::Object(event), Value::Object(fields)) = (&mut event, fields) {
            event.extend(fields);
        }
        let line = format!("[{:>3}/{}] {message}", self.done, self.total);
        self.emit(&line, event);
        if let Some(bar) = &self.bar {
            bar.set_position(self.done as u64);
        }
    }

    fn emit(&self, line: &str, mut event: Value) {
        let elapsed = self.start.elapsed().as_secs_f64();
        match &self.bar {
            Some(bar) => {
                let secs = elapsed as u64;
                bar.println(format!("{:>3}m{:02}s {line}", secs / 60, secs % 60));
            }
            None => {
                event["elapsed_s"] = json!((elapsed * 10.0).round() / 10.0);
                eprintln!("{event}");
            }
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
