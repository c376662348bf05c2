//! `KeyboardEvent.code` (the browser's physical key) → Linux evdev key code
//! (`linux/input-event-codes.h`). Under the evdev XKB rules Xvfb uses, the X keycode is
//! the evdev code plus 8.

/// The evdev key code of the browser key `code`, if it has one.
pub fn evdev(code: &str) -> Option<u16> {
    let letters = "QWERTYUIOP";
    let home = "ASDFGHJKL";
    let bottom = "ZXCVBNM";
    if let Some(l) = code.strip_prefix("Key").filter(|l| l.len() == 1) {
        let l = l.chars().next()?;
        return letters
            .find(l)
            .map(|i| 16 + i as u16)
            .or_else(|| home.find(l).map(|i| 30 + i as u16))
            .or_else(|| bottom.find(l).map(|i| 44 + i as u16));
    }
    if let Some(d) = code.strip_prefix("Digit").and_then(|d| d.parse::<u16>().ok()) {
        return Some(if d == 0 { 11 } else { 1 + d });
    }
    if let Some(n) = code.strip_prefix('F').and_then(|n| n.parse::<u16>().ok()) {
        return match n {
            1..=10 => Some(58 + n),
            11 => Some(87),
            12 => Some(88),
            _ => None,
        };
    }
    Some(match code {
        "Escape" => 1,
        "Minus" => 12,
        "Equal" => 13,
        "Backspace" => 14,
        "Tab" => 15,
        "BracketLeft" => 26,
        "BracketRight" => 27,
        "Enter" => 28,
        "ControlLeft" => 29,
        "Semicolon" => 39,
        "Quote" => 40,
        "Backquote" => 41,
        "ShiftLeft" => 42,
        "Backslash" => 43,
        "Comma" => 51,
        "Period" => 52,
        "Slash" => 53,
        "ShiftRight" => 54,
        "NumpadMultiply" => 55,
        "AltLeft" => 56,
        "Space" => 57,
        "CapsLock" => 58,
        "NumLock" => 69,
        "ScrollLock" => 70,
        "Numpad7" => 71,
        "Numpad8" => 72,
        "Numpad9" => 73,
        "NumpadSubtract" => 74,
        "Numpad4" => 75,
        "Numpad5" => 76,
        "Numpad6" => 77,
        "NumpadAdd" => 78,
        "Numpad1" => 79,
        "Numpad2" => 80,
        "Numpad3" => 81,
        "Numpad0" => 82,
        "NumpadDecimal" => 83,
        "IntlBackslash" => 86,
        "NumpadEnter" => 96,
        "ControlRight" => 97,
        "NumpadDivide" => 98,
        "PrintScreen" => 99,
        "AltRight" => 100,
        "Home" => 102,
        "ArrowUp" => 103,
        "PageUp" => 104,
        "ArrowLeft" => 105,
        "ArrowRight" => 106,
        "End" => 107,
        "ArrowDown" => 108,
        "PageDown" => 109,
        "Insert" => 110,
        "Delete" => 111,
        "Pause" => 119,
        "MetaLeft" => 125,
        "MetaRight" => 126,
        "ContextMenu" => 127,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use pylon_proto::input::KEY_CODES;

    #[test]
    fn every_key_the_browser_sends_has_a_distinct_evdev_code() {
        let mut seen = std::collections::BTreeMap::new();
        for code in KEY_CODES {
            let ev = evdev(code).unwrap_or_else(|| panic!("{code} has no evdev code"));
            assert!(ev > 0 && ev < 248, "{code} → {ev} fits an X keycode");
            if let Some(other) = seen.insert(ev, *code) {
                panic!("{code} and {other} both map to {ev}");
            }
        }
        // Spot checks against linux/input-event-codes.h.
        assert_eq!(evdev("KeyA"), Some(30));
        assert_eq!(evdev("KeyQ"), Some(16));
        assert_eq!(evdev("KeyZ"), Some(44));
        assert_eq!(evdev("Digit1"), Some(2));
        assert_eq!(evdev("Digit0"), Some(11));
        assert_eq!(evdev("F1"), Some(59));
        assert_eq!(evdev("F12"), Some(88));
        assert_eq!(evdev("ArrowUp"), Some(103));
        assert_eq!(evdev("Space"), Some(57));
        assert_eq!(evdev("KeyAA"), None);
        assert_eq!(evdev("F13"), None);
    }
}
