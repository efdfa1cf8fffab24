//! Secret values (temporary re-export until the move lands).
pub use crate::oauth::secret::Secret;
