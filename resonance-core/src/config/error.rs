//! Errors of the experiment configuration.

use std::fmt;
use std::path::PathBuf;

/// One invalid value found by [`ExperimentConfig::validate`](super::ExperimentConfig::validate).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The dotted key, e.g. `lora.rank` or `data.datasets[1].weight`.
    pub key: String,
    /// 1-based line of the key in the config file, when known.
    pub line: Option<usize>,
    /// What is wrong.
    pub message: String,
}

impl Problem {
    pub(crate) fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        Problem {
            key: key.into(),
            line: None,
            message: message.into(),
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(l) => write!(f, "line {l}: key `{}`: {}", self.key, self.message),
            None => write!(f, "key `{}`: {}", self.key, self.message),
        }
    }
}

/// Everything that can go wrong while reading, overriding or validating a config.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("{}: {source}", path.display())]
    Io {
        /// The config file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// TOML syntax error, unknown key or value of the wrong type.
    #[error("{origin}:{line}:{column}: {}{message}", KeyPrefix(key.as_deref()))]
    Parse {
        /// The file name, or `<string>` for a config parsed from memory.
        origin: String,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// The dotted key at fault, when it could be located.
        key: Option<String>,
        /// What is wrong.
        message: String,
    },

    /// Values that parse but are invalid or conflict; one [`Problem`] per line.
    #[error("{}", InvalidList(origin, problems))]
    Invalid {
        /// The file name, or `<string>`.
        origin: String,
        /// The problems, in section order.
        problems: Vec<Problem>,
    },

    /// A `--set key=value` override could not be applied.
    #[error("--set {arg}: key `{key}`: {message}")]
    Override {
        /// The override as given.
        arg: String,
        /// The key it addresses.
        key: String,
        /// What is wrong.
        message: String,
    },

    /// The config could not be written as TOML.
    #[error("cannot serialise the config as TOML: {0}")]
    Serialize(String),
}

impl ConfigError {
    /// The keys this error is about (empty for I/O errors).
    pub fn keys(&self) -> Vec<&str> {
        match self {
            ConfigError::Parse { key: Some(k), .. } | ConfigError::Override { key: k, .. } => {
                vec![k.as_str()]
            }
            ConfigError::Invalid { problems, .. } => {
                problems.iter().map(|p| p.key.as_str()).collect()
            }
            _ => Vec::new(),
        }
    }
}

struct KeyPrefix<'a>(Option<&'a str>);

impl fmt::Display for KeyPrefix<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(k) => write!(f, "key `{k}`: "),
            None => Ok(()),
        }
    }
}

struct InvalidList<'a>(&'a str, &'a [Problem]);

impl fmt::Display for InvalidList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (origin, problems) = (self.0, self.1);
        for (i, p) in problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            match p.line {
                Some(l) => write!(f, "{origin}:{l}: key `{}`: {}", p.key, p.message)?,
                None => write!(f, "{origin}: key `{}`: {}", p.key, p.message)?,
            }
        }
        Ok(())
    }
}
