//! The alert book (raised alerts, and the recently cleared ones) and the
//! webhook's queue; `crate::alerts` evaluates the conditions and delivers.

use std::collections::BTreeMap;
use std::sync::Mutex;

use crate::model::{Alert, AlertEvent, AlertKind};

/// Cleared alerts kept for the API.
const KEEP_CLEARED: usize = 200;
/// Webhook deliveries waiting at most; beyond that the oldest are dropped
/// (and said so in the log).
const QUEUE: usize = 1000;

/// The alert book and the webhook queue.
#[derive(Debug)]
pub struct Alerts {
    book: Mutex<Book>,
    tx: tokio::sync::mpsc::Sender<AlertEvent>,
    rx: Mutex<Option<tokio::sync::mpsc::Receiver<AlertEvent>>>,
}

#[derive(Debug, Default)]
struct Book {
    active: BTreeMap<(AlertKind, String), Alert>,
    cleared: Vec<Alert>,
}

impl Default for Alerts {
    fn default() -> Self {
        let (tx, rx) = tokio::sync::mpsc::channel(QUEUE);
        Alerts { book: Mutex::new(Book::default()), tx, rx: Mutex::new(Some(rx)) }
    }
}

impl Alerts {
    /// Active alerts, then the recently cleared ones, newest first.
    pub fn list(&self) -> Vec<Alert> {
        let Ok(b) = self.book.lock() else { return Vec::new() };
        let mut out: Vec<Alert> = b.active.values().cloned().collect();
        out.sort_by_key(|a| std::cmp::Reverse(a.raised_ms));
        out.extend(b.cleared.iter().rev().cloned());
        out
    }

    /// Takes in the conditions that hold now: raises the new ones, clears
    /// the ended ones; returns the events to post.
    pub(crate) fn update(&self, now: Vec<(AlertKind, String, String, String)>, at: u64) -> Vec<(&'static str, Alert)> {
        let Ok(mut b) = self.book.lock() else { return Vec::new() };
        let mut events = Vec::new();
        let holding: Vec<(AlertKind, String)> = now.iter().map(|(k, s, _, _)| (*k, s.clone())).collect();
        let ended: Vec<(AlertKind, String)> = b.active.keys().filter(|k| !holding.contains(k)).cloned().collect();
        for key in ended {
            if let Some(mut a) = b.active.remove(&key) {
                a.cleared_ms = Some(at);
                events.push(("cleared", a.clone()));
                b.cleared.push(a);
            }
        }
        let excess = b.cleared.len().saturating_sub(KEEP_CLEARED);
        b.cleared.drain(..excess);
        for (kind, subject, subject_name, message) in now {
            match b.active.get_mut(&(kind, subject.clone())) {
                Some(a) => a.message = message,
                None => {
                    let a = Alert {
                        kind,
                        subject: subject.clone(),
                        subject_name,
                        message,
                        raised_ms: at,
                        cleared_ms: None,
                    };
                    events.push(("raised", a.clone()));
                    b.active.insert((kind, subject), a);
                }
            }
        }
        events
    }

    /// The webhook queue's receiving end, once: its delivery task takes it.
    pub(crate) fn take_receiver(&self) -> Option<tokio::sync::mpsc::Receiver<AlertEvent>> {
        self.rx.lock().ok().and_then(|mut r| r.take())
    }

    /// Queues an event for the webhook; false if the queue is full.
    pub(crate) fn queue(&self, e: AlertEvent) -> bool {
        self.tx.try_send(e).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conditions_raise_once_and_clear_when_they_end() {
        let a = Alerts::default();
        let c = |s: &str| (AlertKind::VdsaDown, s.to_string(), s.to_string(), format!("{s} is down"));
        let ev = a.update(vec![c("h1")], 10);
        assert_eq!(ev.len(), 1);
        assert_eq!(ev[0].0, "raised");
        assert!(a.update(vec![c("h1")], 11).is_empty(), "still holding: no new event");
        let ev = a.update(vec![c("h2")], 12);
        assert_eq!(ev.iter().map(|e| e.0).collect::<Vec<_>>(), vec!["cleared", "raised"]);
        let list = a.list();
        assert_eq!(list[0].subject, "h2");
        assert_eq!(list[1].cleared_ms, Some(12));
    }
}
