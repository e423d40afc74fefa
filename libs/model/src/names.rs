//! Validated identifiers and addresses: cluster names, proxy ids, hosts, `host:port`.
//!
//! Everything that arrives from the network is checked here once; the rest
//! of the code can then rely on the invariants (no spaces, no path
//! separators in etcd keys, parseable ports).

use std::fmt;

use crate::ModelError;

const MAX_NAME_LEN: usize = 63;

fn check_name(field: &str, value: &str, extra: &[char]) -> Result<(), ModelError> {
    if value.is_empty() {
        return Err(ModelError::invalid(field, "must not be empty"));
    }
    if value.len() > MAX_NAME_LEN {
        return Err(ModelError::invalid(
            field,
            format!(
                "is {} characters long; at most {MAX_NAME_LEN} allowed",
                value.len()
            ),
        ));
    }
    let first = value.chars().next().unwrap_or(' ');
    if !first.is_ascii_alphanumeric() {
        return Err(ModelError::invalid(
            field,
            format!("{value:?} must start with a letter or digit"),
        ));
    }
    if let Some(bad) = value
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_' || extra.contains(c)))
    {
        let allowed: String = extra.iter().collect();
        return Err(ModelError::invalid(
            field,
            format!(
                "{value:?} contains {bad:?}; only letters, digits, '-', '_'{allowed} are allowed"
            ),
        ));
    }
    Ok(())
}

macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident, $field:literal, $extra:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(String);

        impl $name {
            /// Validates `value`.
            pub fn parse(value: &str) -> Result<Self, ModelError> {
                Self::parse_field($field, value)
            }

            /// Validates `value`, naming `field` in the error.
            pub fn parse_field(field: &str, value: &str) -> Result<Self, ModelError> {
                check_name(field, value, $extra)?;
                Ok(Self(value.to_owned()))
            }

            /// The validated string.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

name_type!(
    /// Name of a cluster: 1-63 characters of `[A-Za-z0-9_-]`, starting alphanumeric.
    ClusterName,
    "name",
    &[]
);
name_type!(
    /// Stable id of a proxy (not an address).
    ProxyId,
    "id",
    &[]
);
name_type!(
    /// Failure domain of a proxy; may also contain dots (`rack1.zone-a`).
    HostName,
    "host",
    &['.']
);

/// A `host:port` network address, as given (no DNS resolution).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Address {
    text: String,
    port: u16,
}

impl Address {
    /// Parses `host:port` or `[ipv6]:port`, naming `field` in errors.
    pub fn parse_field(field: &str, value: &str) -> Result<Self, ModelError> {
        let bad =
            |why: &str| ModelError::invalid(field, format!("{value:?} {why}; expected host:port"));
        let (host, port) = value.rsplit_once(':').ok_or_else(|| bad("has no port"))?;
        let host_ok = if let Some(inner) = host.strip_prefix('[') {
            inner.strip_suffix(']').is_some_and(|h| !h.is_empty())
        } else {
            !host.is_empty()
                && !host.contains(':')
                && host
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-' || c == '_')
        };
        if !host_ok {
            return Err(bad("has an invalid host"));
        }
        let port: u16 = port.parse().map_err(|_| bad("has an invalid port"))?;
        if port == 0 {
            return Err(bad("has port 0"));
        }
        Ok(Self {
            text: value.to_owned(),
            port,
        })
    }

    /// Host part, without IPv6 brackets.
    pub fn host(&self) -> &str {
        let host = &self.text[..self.text.len() - self.port_digits() - 1];
        host.trim_start_matches('[').trim_end_matches(']')
    }

    /// Port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The `host:port` text as given.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    fn port_digits(&self) -> usize {
        self.port.to_string().len()
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(ClusterName::parse("demo").is_ok());
        assert!(ClusterName::parse("a-b_c9").is_ok());
        assert!(ClusterName::parse("").is_err());
        assert!(ClusterName::parse("-x").is_err());
        assert!(ClusterName::parse("a/b").is_err());
        assert!(ClusterName::parse("a b").is_err());
        assert!(ClusterName::parse(&"x".repeat(64)).is_err());
        assert!(ClusterName::parse(&"x".repeat(63)).is_ok());
        assert!(HostName::parse("rack1.zone-a").is_ok());
        assert!(ProxyId::parse("p.1").is_err());
        let err = ClusterName::parse("a/b").unwrap_err().to_string();
        assert!(err.contains("name") && err.contains("'/'"), "{err}");
    }

    #[test]
    fn addresses() {
        let a = Address::parse_field("addr", "127.0.0.1:7001").unwrap();
        assert_eq!((a.host(), a.port()), ("127.0.0.1", 7001));
        let b = Address::parse_field("addr", "[::1]:6379").unwrap();
        assert_eq!((b.host(), b.port()), ("::1", 6379));
        let c = Address::parse_field("addr", "redis-0.svc:6379").unwrap();
        assert_eq!(c.host(), "redis-0.svc");
        for bad in [
            "", "host", ":1", "h:0", "h:65536", "h:x", "::1:5", "[]:5", "a b:1",
        ] {
            assert!(Address::parse_field("addr", bad).is_err(), "{bad}");
        }
    }
}
