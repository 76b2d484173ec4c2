//! Colour in tables, only where a person reads them: stdout is a terminal,
//! `TERM` is not `dumb` and `NO_COLOR` is unset or empty
//! (<https://no-color.org>), unless `--color always|never` says otherwise.

use std::borrow::Cow;
use std::io::IsTerminal;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum ColorChoice {
    #[default]
    Auto,
    Always,
    Never,
}

/// ANSI SGR codes of what tables mark.
pub const COMMIT: &str = "33";
pub const BRANCH: &str = "32";
pub const KEYFRAME: &str = "36";
pub const BROKEN: &str = "1;31";
pub const OK: &str = "32";

/// Whether to colour what goes to stdout.
#[derive(Debug, Clone, Copy)]
pub struct Palette {
    on: bool,
}

impl Palette {
    pub fn for_stdout(choice: ColorChoice) -> Palette {
        let on = match choice {
            ColorChoice::Always => true,
            ColorChoice::Never => false,
            ColorChoice::Auto => {
                let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
                let dumb = std::env::var_os("TERM").is_some_and(|t| t == "dumb");
                std::io::stdout().is_terminal() && !no_color && !dumb
            }
        };
        Palette { on }
    }

    /// `text` in colour `code`; already padded text keeps its width on
    /// screen, since the escapes take none.
    pub fn paint<'t>(&self, text: &'t str, code: &str) -> Cow<'t, str> {
        if self.on && !text.is_empty() {
            Cow::Owned(format!("\x1b[{code}m{text}\x1b[0m"))
        } else {
            Cow::Borrowed(text)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paints_only_when_on() {
        let on = Palette::for_stdout(ColorChoice::Always);
        let off = Palette::for_stdout(ColorChoice::Never);
        assert_eq!(on.paint("main", BRANCH), "\x1b[32mmain\x1b[0m");
        assert_eq!(off.paint("main", BRANCH), "main");
        assert_eq!(on.paint("", BRANCH), "");
    }
}
