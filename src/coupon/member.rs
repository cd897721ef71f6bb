//! Parsing queue members: `"{userId}:{couponId}"`, both positive decimal integers that fit an
//! `i64`, written without sign or leading zeros (docs/contract.md §1). Anything else is malformed and
//! is dead-lettered with the reason returned here.

/// A well-formed request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Request {
    pub user_id: i64,
    pub coupon_id: i64,
}

/// Parses a queue member, or says why it is malformed.
pub(crate) fn parse_member(member: &str) -> Result<Request, &'static str> {
    let (user, coupon) = member
        .split_once(':')
        .ok_or("malformed member: expected userId:couponId")?;
    Ok(Request {
        user_id: parse_id(user).ok_or("malformed member: bad userId")?,
        coupon_id: parse_id(coupon).ok_or("malformed member: bad couponId")?,
    })
}

/// The id grammar lives with the key names (docs/contract.md §1); re-exported for the drain.
pub(crate) use crate::keys::parse_id;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn well_formed_members_parse() {
        assert_eq!(
            parse_member("12:7"),
            Ok(Request {
                user_id: 12,
                coupon_id: 7
            })
        );
        assert_eq!(
            parse_member("9223372036854775807:1").map(|r| r.user_id),
            Ok(i64::MAX)
        );
    }

    #[test]
    fn every_malformed_form_is_rejected() {
        for bad in [
            "",
            "12",
            "12:",
            ":7",
            "12:7:3",
            "0:7",
            "12:0",
            "012:7",
            "12:07",
            "+12:7",
            "-12:7",
            "12:-7",
            " 12:7",
            "12:7 ",
            "1.5:7",
            "12:abc",
            "9223372036854775808:1",
            "１２:7",
        ] {
            assert!(parse_member(bad).is_err(), "{bad:?} should be malformed");
        }
    }
}
