//! Kubernetes rules (`kube_watch::translate::ServiceRule`: a Service's
//! rule of the rule model) for the reconciler. What this load balancer
//! cannot serve is refused with a message that names the rule (it becomes
//! a Warning Event on the Service), never silently changed: the check is
//! the rule model's ([`loxilb_model::supported`]), worded for a Service
//! ([`kube_watch::translate::refusal`]).

use kube_watch::translate::ServiceRule;
use loxilb_model::Rule;

/// Why a Kubernetes rule cannot be installed by this datapath.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{rule}: {reason}")]
pub struct Unsupported {
    pub rule: String,
    pub reason: String,
}

/// The rule of `r` to install, or why it cannot be installed.
pub fn to_rule(r: &ServiceRule) -> Result<Rule, Unsupported> {
    r.supported().map_err(|reason| Unsupported {
        rule: r.rule.name.clone(),
        reason,
    })?;
    Ok(r.rule.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube_watch::ServiceKey;
    use loxilb_model::{Mode, Protocol};

    #[test]
    fn installs_the_rule_as_translated_or_names_it_in_a_refusal() {
        let mut rule = Rule::new("20.0.0.1".parse().unwrap(), 80, Protocol::Tcp);
        rule.name = "default/web:80/tcp@20.0.0.1".into();
        rule.announce_local_only = true;
        let mut r = ServiceRule {
            service: ServiceKey::new("default", "web"),
            rule,
        };
        assert_eq!(to_rule(&r).unwrap(), r.rule);
        r.rule.mode = Mode::OneArm;
        r.rule.protocol = Protocol::Sctp;
        r.rule.secondary_vips = vec!["20.0.0.2".parse().unwrap()];
        let e = to_rule(&r).unwrap_err();
        assert_eq!(e.rule, "default/web:80/tcp@20.0.0.1");
        assert!(
            e.reason.contains("multihoming") && e.reason.contains("loxilb.io/lbmode"),
            "{e}"
        );
    }
}
