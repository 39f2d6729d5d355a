use proptest::prelude::*;

use super::*;

fn decide(grants: &[&str], required: &str) -> Decision {
    Grants::parse(grants.iter().copied())
        .unwrap()
        .decide(&required.parse().unwrap())
}

// P1-P9, P16: the reference table.
#[test]
fn reference_decisions() {
    use Decision::*;
    let cases: &[(&[&str], &str, Decision)] = &[
        (
            &["ticketmaster:67000001:create:ticket"],
            "ticketmaster:67000001:create:ticket",
            Allow,
        ),
        (
            &["ticketmaster:67000001:create:ticket"],
            "ticketmaster:67000002:create:ticket",
            NoGrant,
        ),
        (
            &["ticketmaster:*:create:ticket"],
            "ticketmaster:67000002:create:ticket",
            Allow,
        ),
        (&["*:*:*:*"], "otto::view:deployment", Allow),
        (&["otto::view:deployment"], "otto::view:deployment", Allow),
        (
            &["otto::view:deployment"],
            "otto:67000001:view:deployment",
            NoGrant,
        ),
        (
            &["otto:67000001:view:deployment"],
            "otto::view:deployment",
            NoGrant,
        ),
        (
            &[
                "ticketmaster:67000001:*:*",
                "!ticketmaster:67000001:delete:*",
            ],
            "ticketmaster:67000001:delete:ticket",
            DeniedExplicitly,
        ),
        (
            &[
                "ticketmaster:67000001:*:*",
                "!ticketmaster:67000001:delete:*",
            ],
            "ticketmaster:67000001:view:ticket",
            Allow,
        ),
        (
            &["ticketmaster:67000001:view:ticket"],
            "ticketmaster:67000001:view:tickets",
            NoGrant,
        ),
        (&[], "ticketmaster:67000001:view:ticket", NoGrant),
        // Deny wins regardless of order and of where the allow comes from.
        (
            &["!*:*:*:*", "ticketing:1:view:ticket"],
            "ticketing:1:view:ticket",
            DeniedExplicitly,
        ),
        // Account ids are case-sensitive and opaque.
        (
            &["ticketing:AbC:view:ticket"],
            "ticketing:abc:view:ticket",
            NoGrant,
        ),
    ];
    for (grants, required, want) in cases {
        assert_eq!(decide(grants, required), *want, "{grants:?} -> {required}");
    }
}

// P10-P13: grants outside the grammar are refused.
#[test]
fn invalid_grants_are_refused() {
    for bad in [
        "Ticketmaster:67000001:view:ticket",
        "ticketmaster:67000001:view",
        "ticketmaster:67000001:view,create:ticket",
        "ticket*:67000001:view:ticket",
        "ticketmaster:67000001:view:ticket:extra",
        "ticketmaster:6700 0001:view:ticket",
        "ticketmaster:67000001:vi?w:ticket",
        ":67000001:view:ticket",
        "!",
        "!!a:b:c:d",
        "",
        "a:b:c:**",
        &format!("{}:1:view:ticket", "a".repeat(65)),
    ] {
        assert!(bad.parse::<Grant>().is_err(), "{bad} was accepted");
    }
    assert!("ticketing::view:ticket".parse::<Grant>().is_ok());
    assert!(
        format!("{}:1:view:ticket", "a".repeat(64))
            .parse::<Grant>()
            .is_ok()
    );
}

#[test]
fn token_grants_drop_bad_allows_but_refuse_bad_denies() {
    let (grants, rejected) =
        Grants::from_claim(["ticketing:1:view:ticket", "Bad:1:view:ticket", "x:y"]).unwrap();
    assert_eq!(grants.len(), 1);
    assert_eq!(rejected.iter().map(|(i, _)| *i).collect::<Vec<_>>(), [1, 2]);
    let err = Grants::from_claim(["ticketing:*:*:*", "!ticketing:*:Delete:*"]).unwrap_err();
    assert!(matches!(err, GrantsError::InvalidDeny { index: 1, .. }));
    let many: Vec<String> = (0..=MAX_GRANTS).map(|i| format!("s:{i}:view:x")).collect();
    assert_eq!(
        Grants::from_claim(many.iter().map(String::as_str)).unwrap_err(),
        GrantsError::TooMany
    );
}

#[test]
fn token_grants_refuse_any_malformed_grant_with_a_bang() {
    for bad in [
        " !ticketing:1:delete:*",
        "!ticketing:1:delete",
        "!!x:y:z:w",
        "ticketing:1:delete:*!",
        "ticketing:!1:delete:*",
        "\u{a0}!ticketing:1:delete:*",
    ] {
        let err = Grants::from_claim(["ticketing:*:*:*", bad]).unwrap_err();
        assert!(
            matches!(err, GrantsError::InvalidDeny { index: 1, .. }),
            "{bad:?}: {err:?}"
        );
    }
    // Without a `!`, a malformed grant is an allow that is dropped.
    let (grants, rejected) =
        Grants::from_claim([" ticketing:1:view:*", "!ticketing:1:delete:*"]).unwrap();
    assert_eq!(grants.len(), 1);
    assert_eq!(rejected.len(), 1);
}

// P14, P15: requirements can never carry a wildcard or shift segments.
#[test]
fn requirements_are_concrete() {
    for bad in [
        "*",
        "",
        "1:create",
        "1,2",
        "٦٧",
        "a b",
        "a%2A",
        "a/b",
        "a.b",
        "1\n",
        "1\0",
        &"1".repeat(65),
    ] {
        assert!(
            AccountId::parse(bad).is_err(),
            "{bad:?} accepted as an account"
        );
    }
    for bad in [
        "ticketing:*:view:ticket",
        "*:1:view:ticket",
        "ticketing:1:view:*",
        "ticketing:1:create:view:ticket",
        "ticketing:1:view",
        "!ticketing:1:view:ticket",
    ] {
        assert!(
            bad.parse::<Permission>().is_err(),
            "{bad} accepted as a requirement"
        );
    }
    assert!(Permission::new("ticketing", None, "vi*w", "ticket").is_err());
    // Opaque ids are kept as they are, not canonicalised.
    let a = AccountId::parse("067000001").unwrap();
    assert_eq!(
        Permission::new("t", Some(&a), "view", "x")
            .unwrap()
            .as_str(),
        "t:067000001:view:x"
    );
}

#[test]
fn templates_fill_only_with_valid_values() {
    let t: PermissionTemplate = "ticketing:{account}:create:ticket".parse().unwrap();
    assert!(t.has_account_param());
    assert_eq!(t.params().collect::<Vec<_>>(), ["account"]);
    let (p, account) = t.fill(|n| (n == "account").then_some("67000001")).unwrap();
    assert_eq!(p.as_str(), "ticketing:67000001:create:ticket");
    assert_eq!(account.unwrap().as_str(), "67000001");
    for bad in ["*", "1:create", "1,2", "", "٦٧", &"9".repeat(65)] {
        assert_eq!(t.fill(|_| Some(bad)).unwrap_err(), "account", "{bad:?}");
    }
    assert_eq!(t.fill(|_| None).unwrap_err(), "account");

    let t: PermissionTemplate = "docs:{account}:view:{kind}".parse().unwrap();
    assert_eq!(
        t.fill(|n| Some(if n == "kind" { "Report" } else { "1" }))
            .unwrap_err(),
        "kind"
    );

    let t: PermissionTemplate = "otto::view:deployment".parse().unwrap();
    let (p, account) = t.fill(|_| None).unwrap();
    assert_eq!(p.as_str(), "otto::view:deployment");
    assert!(account.is_none());

    for bad in [
        "ticketing:*:view:ticket",
        "ticketing:{}:view:ticket",
        "ticketing:{a-b}:view:x",
        "a:b:c",
        "A:{x}:b:c",
    ] {
        assert!(bad.parse::<PermissionTemplate>().is_err(), "{bad}");
    }
}

// P18: many grants stay cheap because they are indexed by service.
#[test]
fn many_grants_are_indexed() {
    let owned: Vec<String> = (0..4000).map(|i| format!("svc{i}:1:view:thing")).collect();
    let grants = Grants::parse(owned.iter().map(String::as_str)).unwrap();
    assert_eq!(grants.len(), 4000);
    assert_eq!(grants.by_service["svc7"].allow.len(), 1);
    assert_eq!(
        grants.decide(&"svc3999:1:view:thing".parse().unwrap()),
        Decision::Allow
    );
    assert_eq!(
        grants.decide(&"svc4000:1:view:thing".parse().unwrap()),
        Decision::NoGrant
    );
}

fn segment_strategy(account: bool) -> impl Strategy<Value = String> {
    if account {
        prop_oneof![
            Just(String::new()),
            "[A-Za-z0-9_-]{1,4}",
            Just("a".to_owned())
        ]
        .boxed()
    } else {
        prop_oneof!["[a-c][a-c0-9_-]{0,2}", Just("a".to_owned())].boxed()
    }
}

fn grant_strategy() -> impl Strategy<Value = (bool, [String; 4])> {
    let seg = |account| prop_oneof![3 => segment_strategy(account), 1 => Just("*".to_owned())];
    (
        any::<bool>(),
        [seg(false), seg(true), seg(false), seg(false)],
    )
}

fn required_strategy() -> impl Strategy<Value = [String; 4]> {
    [
        segment_strategy(false),
        segment_strategy(true),
        segment_strategy(false),
        segment_strategy(false),
    ]
}

proptest! {
    // P17: matching is exactly segment-wise equality or `*`.
    #[test]
    fn matching_is_segment_wise((deny, g) in grant_strategy(), r in required_strategy()) {
        let text = format!("{}{}", if deny { "!" } else { "" }, g.join(":"));
        let grant: Grant = text.parse().unwrap();
        let required: Permission = r.join(":").parse().unwrap();
        let expected = (0..4).all(|i| g[i] == "*" || g[i] == r[i]);
        prop_assert_eq!(grant.matches(&required), expected);
        let decision = Grants::parse([text.as_str()]).unwrap().decide(&required);
        let want = match (expected, deny) {
            (true, false) => Decision::Allow,
            (true, true) => Decision::DeniedExplicitly,
            (false, _) => Decision::NoGrant,
        };
        prop_assert_eq!(decision, want);
    }

    // Deny wins over any set of allows.
    #[test]
    fn deny_always_wins(grants in proptest::collection::vec(grant_strategy(), 0..8), r in required_strategy()) {
        let texts: Vec<String> = grants
            .iter()
            .map(|(deny, g)| format!("{}{}", if *deny { "!" } else { "" }, g.join(":")))
            .collect();
        let required: Permission = r.join(":").parse().unwrap();
        let set = Grants::parse(texts.iter().map(String::as_str)).unwrap();
        let parsed: Vec<Grant> = texts.iter().map(|t| t.parse().unwrap()).collect();
        let any_deny = parsed.iter().any(|g| g.is_deny() && g.matches(&required));
        let any_allow = parsed.iter().any(|g| !g.is_deny() && g.matches(&required));
        let want = if any_deny {
            Decision::DeniedExplicitly
        } else if any_allow {
            Decision::Allow
        } else {
            Decision::NoGrant
        };
        prop_assert_eq!(set.decide(&required), want);
    }

    // Parsing arbitrary text never panics, and what parses round-trips.
    #[test]
    fn parsing_never_panics(s in "\\PC{0,40}") {
        if let Ok(g) = s.parse::<Grant>() {
            prop_assert_eq!(g.to_string(), s.clone());
        }
        if let Ok(p) = s.parse::<Permission>() {
            prop_assert_eq!(p.to_string(), s.clone());
        }
        let _ = s.parse::<PermissionTemplate>();
        let _ = AccountId::parse(&s);
    }
}
