//! Handles of collectives in flight.

use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::time::Duration;

use crate::{Buffer, CommError};

/// Called when a waiter gives up on a collective, so that the engine can fail
/// the whole group rather than leave the other ranks hanging.
pub type AbortFn = Arc<dyn Fn(CommError) + Send + Sync>;

type Convert<T> = Box<dyn FnOnce(Buffer) -> Result<T, CommError> + Send>;

/// A collective in flight. [`Work::wait`] blocks until it completes, fails,
/// or the communicator's timeout passes.
///
/// Dropping a `Work` does not cancel the collective: it still runs, and its
/// result is discarded.
#[must_use = "a collective's result or error arrives only through wait()"]
pub struct Work<T = Buffer> {
    rx: Receiver<Result<Buffer, CommError>>,
    /// A result taken off the channel by `is_ready`.
    early: Option<Result<Buffer, CommError>>,
    convert: Convert<T>,
    timeout: Duration,
    describe: String,
    abort: Option<AbortFn>,
}

/// The engine's end of a [`Work`]: completes it exactly once.
pub struct Completion {
    tx: Sender<Result<Buffer, CommError>>,
}

impl Completion {
    /// Delivers the result; a waiter that already gave up ignores it.
    pub fn complete(self, result: Result<Buffer, CommError>) {
        let _ = self.tx.send(result);
    }
}

impl Work<Buffer> {
    /// A new pending work and the completion that resolves it.
    ///
    /// `timeout` bounds [`Work::wait`]; `describe` names the collective in
    /// timeout errors; `abort` is called if a waiter times out.
    pub fn pending(
        timeout: Duration,
        describe: String,
        abort: Option<AbortFn>,
    ) -> (Work<Buffer>, Completion) {
        let (tx, rx) = mpsc::channel();
        let work = Work {
            rx,
            early: None,
            convert: Box::new(Ok),
            timeout,
            describe,
            abort,
        };
        (work, Completion { tx })
    }

    /// A work that is already complete (or failed).
    pub fn ready(result: Result<Buffer, CommError>) -> Work<Buffer> {
        let (work, done) = Work::pending(Duration::from_secs(1), String::new(), None);
        done.complete(result);
        work
    }
}

impl<T: 'static> Work<T> {
    /// A work that has already failed with `err`.
    pub fn failed(err: CommError) -> Work<T> {
        let (tx, rx) = mpsc::channel();
        let _ = tx.send(Err(err));
        Work {
            rx,
            early: None,
            // Never called: the result is the error above.
            convert: Box::new(|_| {
                Err(CommError::InvalidArgument(
                    "failed work has no value".into(),
                ))
            }),
            timeout: Duration::from_secs(1),
            describe: String::new(),
            abort: None,
        }
    }

    /// Waits for the engine's verdict. Engines fail a collective whose peers
    /// do not arrive within the communicator's timeout, so this returns by
    /// then; as a backstop against a broken engine it gives up after twice
    /// that plus a second.
    pub fn wait(self) -> Result<T, CommError> {
        let backstop = self.timeout * 2 + Duration::from_secs(1);
        self.wait_timeout(backstop)
    }

    /// Waits up to `timeout`. On timeout the group is failed, so the other
    /// ranks' collectives error out too instead of hanging.
    pub fn wait_timeout(mut self, timeout: Duration) -> Result<T, CommError> {
        if let Some(result) = self.early.take() {
            return result.and_then(self.convert);
        }
        match self.rx.recv_timeout(timeout) {
            Ok(result) => result.and_then(self.convert),
            Err(RecvTimeoutError::Timeout) => {
                let err = CommError::Engine {
                    engine: "wait",
                    message: format!("{} did not complete within {timeout:?}", self.describe),
                };
                if let Some(abort) = &self.abort {
                    abort(err.clone());
                }
                Err(err)
            }
            Err(RecvTimeoutError::Disconnected) => Err(CommError::Engine {
                engine: "wait",
                message: format!(
                    "{} was dropped by its engine without a result (engine thread died)",
                    self.describe
                ),
            }),
        }
    }

    /// Whether the result (or error) has arrived, so `wait` returns at once.
    pub fn is_ready(&mut self) -> bool {
        if self.early.is_none() {
            match self.rx.try_recv() {
                Ok(result) => self.early = Some(result),
                Err(mpsc::TryRecvError::Empty) => return false,
                Err(mpsc::TryRecvError::Disconnected) => return true,
            }
        }
        true
    }

    /// Transforms the result when it is waited for.
    pub fn map<U: 'static>(
        self,
        f: impl FnOnce(T) -> Result<U, CommError> + Send + 'static,
    ) -> Work<U>
    where
        T: Send,
    {
        let convert = self.convert;
        Work {
            rx: self.rx,
            early: self.early,
            convert: Box::new(move |buffer| convert(buffer).and_then(f)),
            timeout: self.timeout,
            describe: self.describe,
            abort: self.abort,
        }
    }
}
