//! What the benchmark binaries share on the command line and in their tables: `--flag value` /
//! `--flag=value` parsing, whole-number flag values, and rates printed with thousands separators.

use anyhow::{Context, bail};

/// The arguments after the program name, flag by flag.
pub struct Flags<I> {
    args: I,
}

impl<I: Iterator<Item = String>> Flags<I> {
    /// The flags of `args`.
    pub fn new(args: impl IntoIterator<IntoIter = I>) -> Self {
        Flags {
            args: args.into_iter(),
        }
    }

    /// The next flag, and its value when written `--flag=value`.
    pub fn next_flag(&mut self) -> Option<(String, Option<String>)> {
        let arg = self.args.next()?;
        Some(match arg.split_once('=') {
            Some((flag, value)) if flag.starts_with("--") => {
                (flag.to_owned(), Some(value.to_owned()))
            }
            _ => (arg, None),
        })
    }

    /// The value of `flag`: the one written after `=`, else the next argument.
    pub fn value(&mut self, flag: &str, inline: &Option<String>) -> anyhow::Result<String> {
        inline
            .clone()
            .or_else(|| self.args.next())
            .with_context(|| format!("{flag} needs a value"))
    }
}

/// `value` as a whole number, or an error naming `flag`.
pub fn number<T: std::str::FromStr>(flag: &str, value: &str) -> anyhow::Result<T> {
    value
        .parse()
        .ok()
        .with_context(|| format!("{flag} is {value:?}; expected a whole number"))
}

/// `value` as a whole number of at least 1.
pub fn positive<T: std::str::FromStr + Default + PartialEq>(
    flag: &str,
    value: &str,
) -> anyhow::Result<T> {
    let n: T = number(flag, value)?;
    if n == T::default() {
        bail!("{flag} must be at least 1");
    }
    Ok(n)
}

/// A rate rounded to a whole number, with thousands separated by commas.
pub fn grouped(value: f64) -> String {
    let digits = format!("{:.0}", value.max(0.0));
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The median of `values` (the mean of the middle two for an even count); `None` when empty or
/// when a value is not a number.
pub fn median(values: &[f64]) -> Option<f64> {
    if values.is_empty() || values.iter().any(|v| v.is_nan()) {
        return None;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    Some(if sorted.len() % 2 == 1 {
        sorted[mid]
    } else {
        (sorted[mid - 1] + sorted[mid]) / 2.0
    })
}

#[cfg(test)]
mod tests {
    use super::median;

    #[test]
    fn one_stalled_round_does_not_move_the_median() {
        assert_eq!(median(&[0.28, 7.0, 0.29]), Some(0.29));
        assert_eq!(median(&[0.3, 0.1, 0.2, 0.4]), Some(0.25));
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[0.3, f64::NAN]), None);
    }
}
