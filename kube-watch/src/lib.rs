//! The Kubernetes side of the agent: watches LoadBalancer Services and turns
//! them into rules. Intentionally empty until the Kubernetes issue lands; the
//! agent runs in standalone mode (rules from a YAML file) until then.
