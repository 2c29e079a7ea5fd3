//! The shutdown signal: a `watch` channel that turns true once. A leaf.

use tokio::sync::watch;

/// Resolves once shutdown is requested (or the sender is gone). Unlike awaiting
/// `wait_for` directly, it holds no borrow of the channel afterwards, so it is safe in any
/// `select!` arm.
pub async fn requested(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}
