//! The socket queue: frames waiting for one session's socket, bounded in messages *and* bytes.
//!
//! Delivery must never wait on a client, so senders only [`Sender::try_send`]; a full queue
//! tells the caller to disconnect the client as a slow consumer. A bound on the message count
//! alone lets one stuck client pin `count × largest frame` (1,024 × 64 KiB = 64 MiB with the
//! defaults); the byte bound caps it at about `max_bytes` plus the socket's buffers.
//!
//! One message is always accepted into an empty queue, whatever its size, so a frame larger
//! than the byte bound still reaches a client that keeps up.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::mpsc;

/// Why [`Sender::try_send`] refused an item (the item is dropped).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrySendError {
    /// The queue holds its maximum of messages or bytes.
    Full,
    /// The receiver is gone.
    Closed,
}

/// A queue of at most `max_messages` items and about `max_bytes` bytes.
pub fn channel<T>(max_messages: usize, max_bytes: usize) -> (Sender<T>, Receiver<T>) {
    let (tx, rx) = mpsc::channel(max_messages.max(1));
    let bytes = Arc::new(AtomicUsize::new(0));
    (
        Sender {
            tx,
            bytes: bytes.clone(),
            max_bytes,
        },
        Receiver { rx, bytes },
    )
}

/// The sending half; cheap to clone.
#[derive(Debug)]
pub struct Sender<T> {
    /// Each item travels with its size, so the receiver releases exactly what was counted.
    tx: mpsc::Sender<(T, usize)>,
    /// Bytes queued now, shared with the receiver.
    bytes: Arc<AtomicUsize>,
    max_bytes: usize,
}

impl<T> Clone for Sender<T> {
    fn clone(&self) -> Self {
        Self {
            tx: self.tx.clone(),
            bytes: self.bytes.clone(),
            max_bytes: self.max_bytes,
        }
    }
}

impl<T> Sender<T> {
    /// Queues `item`, counted as `size` bytes, without waiting.
    pub fn try_send(&self, item: T, size: usize) -> Result<(), TrySendError> {
        // Reserve first, so concurrent senders cannot overshoot the bound together.
        let before = self.bytes.fetch_add(size, Ordering::AcqRel);
        if before > 0 && before + size > self.max_bytes {
            self.bytes.fetch_sub(size, Ordering::AcqRel);
            return Err(TrySendError::Full);
        }
        self.tx.try_send((item, size)).map_err(|e| {
            self.bytes.fetch_sub(size, Ordering::AcqRel);
            match e {
                mpsc::error::TrySendError::Full(_) => TrySendError::Full,
                mpsc::error::TrySendError::Closed(_) => TrySendError::Closed,
            }
        })
    }
}

/// The receiving half, owned by the session task.
#[derive(Debug)]
pub struct Receiver<T> {
    rx: mpsc::Receiver<(T, usize)>,
    bytes: Arc<AtomicUsize>,
}

impl<T> Receiver<T> {
    /// The next item; `None` once every sender is gone and the queue is empty.
    pub async fn recv(&mut self) -> Option<T> {
        let (item, size) = self.rx.recv().await?;
        self.bytes.fetch_sub(size, Ordering::AcqRel);
        Some(item)
    }

    /// The next item if one is queued.
    pub fn try_recv(&mut self) -> Option<T> {
        let (item, size) = self.rx.try_recv().ok()?;
        self.bytes.fetch_sub(size, Ordering::AcqRel);
        Some(item)
    }

    /// Bytes queued now.
    pub fn bytes(&self) -> usize {
        self.bytes.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_messages() {
        let (tx, mut rx) = channel::<u8>(2, usize::MAX);
        assert_eq!(tx.try_send(1, 1), Ok(()));
        assert_eq!(tx.try_send(2, 1), Ok(()));
        assert_eq!(tx.try_send(3, 1), Err(TrySendError::Full));
        assert_eq!(rx.try_recv(), Some(1));
        assert_eq!(tx.try_send(3, 1), Ok(()));
        assert_eq!(rx.try_recv(), Some(2));
        assert_eq!(rx.try_recv(), Some(3));
        assert_eq!(rx.try_recv(), None);
    }

    #[test]
    fn bounds_bytes_and_releases_them_on_receive() {
        let (tx, mut rx) = channel::<&str>(100, 10);
        assert_eq!(tx.try_send("a", 6), Ok(()));
        assert_eq!(tx.try_send("b", 4), Ok(()), "exactly at the bound fits");
        assert_eq!(rx.bytes(), 10);
        assert_eq!(tx.try_send("c", 1), Err(TrySendError::Full));
        assert_eq!(rx.bytes(), 10, "a refused item is not counted");
        assert_eq!(rx.try_recv(), Some("a"));
        assert_eq!(rx.bytes(), 4);
        assert_eq!(tx.try_send("c", 6), Ok(()));
        assert_eq!(tx.try_send("d", 1), Err(TrySendError::Full));
    }

    #[test]
    fn an_empty_queue_takes_one_item_of_any_size() {
        let (tx, mut rx) = channel::<&str>(100, 10);
        assert_eq!(tx.try_send("huge", 1000), Ok(()));
        assert_eq!(tx.try_send("tiny", 1), Err(TrySendError::Full));
        assert_eq!(rx.try_recv(), Some("huge"));
        assert_eq!(rx.bytes(), 0);
        assert_eq!(tx.try_send("tiny", 1), Ok(()));
    }

    #[tokio::test]
    async fn reports_a_closed_receiver_and_releases_its_reservation() {
        let (tx, rx) = channel::<u8>(4, 100);
        let bytes = rx.bytes.clone();
        drop(rx);
        assert_eq!(tx.try_send(1, 10), Err(TrySendError::Closed));
        assert_eq!(bytes.load(Ordering::Acquire), 0);
    }

    #[tokio::test]
    async fn recv_waits_for_an_item_and_ends_when_senders_are_gone() {
        let (tx, mut rx) = channel::<u8>(4, 100);
        let sender = tokio::spawn(async move { tx.try_send(7, 3) });
        assert_eq!(rx.recv().await, Some(7));
        assert_eq!(sender.await.unwrap(), Ok(()));
        assert_eq!(rx.bytes(), 0);
        assert_eq!(rx.recv().await, None);
    }
}
