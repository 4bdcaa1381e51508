//! Dataset records for supervised fine-tuning of vision-language models.
//!
//! * [`record`]: the normalised [`Conversation`] every format is converted into.
//! * [`format`]: the supported formats ([`DataFormat`]) and their conversion rules, including
//!   where image parts are placed.
//! * [`preference`]: the published preference layouts (VLFeedback with VL-RLHF's pairing, RLHF-V)
//!   and TRL's conversational preference / unpaired forms.
//! * [`load`]: reading JSON arrays and JSON lines (detected by content) and Parquet files
//!   ([`parquet`]: row by row, embedded images cached), the bad-record policy ([`OnError`]) and
//!   the [`LoadReport`].
//! * [`mixture`]: the deterministic, resumable [`MixtureSampler`] over several datasets.
//!
//! Errors ([`DataError`]) name the file, the line (Parquet: the 1-based row) and the field, e.g.
//! `data/train.jsonl:14: field `conversations[3].from`: unknown role `bot` (...)`.

pub mod error;
pub mod format;
pub mod load;
pub mod mixture;
pub mod parquet;
pub mod preference;
pub mod record;

pub use error::{DataError, RecordErrorKind};
pub use format::{
    parse_record, parse_records, DataFormat, ParseOptions, ParsedRecord, RecordProblem,
    IMAGE_PLACEHOLDER, LARGEST_GAP,
};
pub use load::{
    load_dataset, parse_dataset, Dataset, LoadOptions, LoadReport, OnError, SkippedRecord,
    MAX_SKIPPED_EXAMPLES,
};
pub use mixture::{Mixing, MixtureSampler, SampleRef, SamplerPosition};
pub use record::{Conversation, Message, Part, RecordSource, Role};
