//! The bus between nodes: the [`writer`] appends what other nodes must deliver to their Redis
//! inboxes (one pipeline per batch), the [`reader`] reads this node's inbox and delivers it
//! locally.

pub mod reader;
pub mod writer;
