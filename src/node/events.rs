//! Handing events to the events appender (`--events`, see `backend::events`): a session
//! waits for its event to be in Redis before it goes on (so the backend has it before anyone
//! sees what it concerns, and one session's events are appended in order); the node's own
//! reports (a dead node's sessions, a refused ingress entry) do not wait.

use tokio::sync::oneshot;

use crate::node::Node;
use crate::wire::client::ClientError;
use crate::wire::event::{Event, EventKind};

impl Node {
    /// Whether events of `kind` are appended.
    pub fn wants(&self, kind: EventKind) -> bool {
        self.events.is_some() && self.event_kinds.has(kind)
    }

    /// Appends `event` to the events stream and waits until Redis has it; `bus unavailable`
    /// when it could not be appended.
    pub async fn append_event(&self, event: Event) -> Result<(), ClientError> {
        let Some(queue) = &self.events else {
            return Ok(());
        };
        let (done, appended) = oneshot::channel();
        queue
            .send((event, Some(done)))
            .await
            .map_err(|_| ClientError::BusUnavailable)?;
        match appended.await {
            Ok(true) => Ok(()),
            _ => Err(ClientError::BusUnavailable),
        }
    }

    /// Queues `event` for the events stream without waiting (it may be lost if Redis is
    /// down: it is logged then).
    pub async fn report_event(&self, event: Event) {
        if let Some(queue) = &self.events
            && queue.send((event, None)).await.is_err()
        {
            tracing::debug!("event not appended: the events appender stopped");
        }
    }
}
