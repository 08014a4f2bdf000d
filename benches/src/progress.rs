//! Progress of a long run, on stderr (stdout is kept for the final table): one line per step on a
//! terminal, one JSON object per line otherwise (CI logs, scripts).

use serde_json::{Value, json};
use std::io::IsTerminal;
use std::time::Instant;

pub struct Progress {
    tty: bool,
    start: Instant,
    done: usize,
    total: usize,
}

impl Progress {
    pub fn new() -> Progress {
        Progress {
            tty: std::io::stderr().is_terminal(),
            start: Instant::now(),
            done: 0,
            total: 0,
        }
    }

    /// Sets the number of passes to come.
    pub fn expect(&mut self, total: usize) {
        self.total = total;
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
    }

    fn emit(&self, line: &str, mut event: Value) {
        let elapsed = self.start.elapsed().as_secs_f64();
        if self.tty {
            let secs = elapsed as u64;
            eprintln!("{:>3}m{:02}s {line}", secs / 60, secs % 60);
        } else {
            event["elapsed_s"] = json!((elapsed * 10.0).round() / 10.0);
            eprintln!("{event}");
        }
    }
}
