//! What a local session or the spool asks of an upstream: open a transaction for an account,
//! a sender and the recipients known so far (each with its own verdict; SMTP sends them in
//! one flight where the upstream pipelines), add later recipients one by one, send the content
//! (whole, or streamed piece by piece as it arrives), and finish or abort (or abandon it
//! mid-content: the upstream never sees the final dot). The session and the spool
//! deliverer speak only this interface; how a transport reaches Microsoft 365 is its own
//! business (`relay::smtp::transaction`: SMTP sessions from the pool), so another transport
//! is a new variant here, not an edit of the session.

use crate::relay::envelope::{Address, MailParams, ReversePath};
use crate::relay::pool::{BeginError, Pool};
use crate::relay::smtp::transaction::{RcptVerdicts, SmtpTransaction};
use crate::relay::upstream::{UpReply, UpstreamError};

/// The upstream transport of all accounts.
#[derive(Debug, Clone)]
pub struct Transport {
    pool: Pool,
}

impl Transport {
    pub(crate) fn smtp(pool: Pool) -> Transport {
        Transport { pool }
    }

    /// Opens a transaction for `account` with this sender and the recipients `rcpts` (SMTP:
    /// a pooled session, MAIL and a RCPT each). `size` is the real message size when known
    /// (spool), else the client's SIZE=. The sender's reply and each recipient's verdict, in
    /// order; a refused sender is an error.
    pub(crate) async fn begin(
        &self,
        account: &str,
        from: &ReversePath,
        params: &MailParams,
        size: Option<usize>,
        rcpts: &[Address],
    ) -> Result<(Transaction, UpReply, RcptVerdicts), BeginError> {
        let (t, reply, verdicts) =
            SmtpTransaction::begin(&self.pool, account, (from, params, size), rcpts).await?;
        Ok((Transaction::Smtp(t), reply, verdicts))
    }
}

/// One open upstream transaction (the sender accepted).
#[derive(Debug)]
pub(crate) enum Transaction {
    Smtp(SmtpTransaction),
}

impl Transaction {
    /// Adds a recipient; the upstream's verdict on it.
    pub(crate) async fn rcpt(&mut self, to: &Address) -> Result<UpReply, UpstreamError> {
        match self {
            Transaction::Smtp(t) => t.rcpt(to).await,
        }
    }

    /// The upstream can no longer carry this transaction (the connection broke).
    pub(crate) fn is_broken(&mut self) -> bool {
        match self {
            Transaction::Smtp(t) => t.is_broken(),
        }
    }

    /// Announces the content (SMTP: `DATA`, answered 354, or nothing where the content goes
    /// as BDAT); any other positive reply is a protocol error and nothing is sent.
    pub(crate) async fn start_data(&mut self) -> Result<UpReply, UpstreamError> {
        match self {
            Transaction::Smtp(t) => t.start_data().await,
        }
    }

    /// Streams one piece of the content (unstuffed, CRLF line endings, split anywhere)
    /// after [`Transaction::start_data`]. On an error the transaction is lost (4xx to the
    /// client); nothing more may be sent.
    pub(crate) async fn send_chunk(&mut self, chunk: &[u8]) -> Result<(), UpstreamError> {
        match self {
            Transaction::Smtp(t) => t.send_chunk(chunk).await,
        }
    }

    /// Ends the content; the final verdict (2xx taken, 4xx/5xx refused).
    pub(crate) async fn finish_content(&mut self) -> Result<UpReply, UpstreamError> {
        match self {
            Transaction::Smtp(t) => t.finish_content().await,
        }
    }

    /// Gives up mid-content: nothing of it is ever delivered.
    pub(crate) fn break_off(&mut self) {
        match self {
            Transaction::Smtp(t) => t.break_off(),
        }
    }

    /// Drops the transaction mid-content: the upstream never takes the message.
    pub(crate) fn abandon(self) {
        match self {
            Transaction::Smtp(t) => t.abandon(),
        }
    }

    /// Done with the transaction after a final verdict (or a refused DATA).
    pub(crate) async fn finish(self) {
        match self {
            Transaction::Smtp(t) => t.finish().await,
        }
    }

    /// Abandons the transaction before its content.
    pub(crate) async fn abort(self) {
        match self {
            Transaction::Smtp(t) => t.abort().await,
        }
    }
}
