//! [`RateLimitService`]: the middleware itself, and the headers it writes.

use std::fmt::{self, Write as _};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode};
use statehouse::{Decision, LimitCheck, Verdict};
use tower_service::Service;

use super::layer::{Config, RateLimitRule};

/// `RateLimit-Policy` (draft-ietf-httpapi-ratelimit-headers): each rule's quota and window.
pub(crate) const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
/// `RateLimit`: what remains of each quota and when it is whole again.
pub(crate) const RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");

/// The service of a [`RateLimitLayer`](super::RateLimitLayer).
///
/// The inner service must be `Clone` (it is called after the limiter answers) and its response
/// body must be buildable from [`Bytes`] (axum's `Body` and `Full<Bytes>` are), for the `429`
/// and `503` answers.
pub struct RateLimitService<S> {
    inner: S,
    config: Arc<Config>,
}

impl<S: Clone> Clone for RateLimitService<S> {
    fn clone(&self) -> Self {
        RateLimitService {
            inner: self.inner.clone(),
            config: self.config.clone(),
        }
    }
}

impl<S: fmt::Debug> fmt::Debug for RateLimitService<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimitService")
            .field("inner", &self.inner)
            .field("rules", &self.config.rules)
            .finish_non_exhaustive()
    }
}

impl<S> RateLimitService<S> {
    pub(crate) fn new(inner: S, config: Arc<Config>) -> Self {
        RateLimitService { inner, config }
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for RateLimitService<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqBody: Send + 'static,
    ResBody: From<Bytes> + Send + 'static,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Response<ResBody>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        // The clone is the one left for the next request; the ready one serves this one.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let config = self.config.clone();
        Box::pin(async move {
            let (shadow, applicable): (Vec<_>, Vec<_>) = config
                .applicable(&req)
                .into_iter()
                .partition(|(rule, _)| rule.shadow);
            if applicable.is_empty() {
                shadow_check(&config, &shadow).await;
                return inner.call(req).await;
            }
            let checks: Vec<LimitCheck<'_>> = applicable
                .iter()
                .map(|(rule, key)| LimitCheck::new(key, &rule.policy, rule.cost))
                .collect();
            let verdict = match config.limiter.check_all(&checks).await {
                Ok(verdict) => verdict,
                Err(err) => {
                    config.store_errors.fetch_add(1, Ordering::Relaxed);
                    return Ok(store_failed(&err));
                }
            };
            let rules: Vec<&RateLimitRule> = applicable.iter().map(|(rule, _)| *rule).collect();
            for (rule, decision) in rules.iter().zip(&verdict.decisions) {
                rule.counters.count(!decision.allowed, decision.degraded);
            }
            if !verdict.allowed() {
                return Ok(too_many_requests(&rules, &verdict));
            }
            shadow_check(&config, &shadow).await;
            let delay = verdict
                .decisions
                .iter()
                .map(|d| d.delay)
                .max()
                .unwrap_or_default();
            if !delay.is_zero() {
                // A leaky bucket shapes: the request leaves when its turn comes. The inner
                // service's readiness (a concurrency or buffer slot it reserved) is given back
                // for the wait and asked for again after it, so that waiting requests do not
                // hold the slots of the requests that can go now.
                let fresh = inner.clone();
                drop(inner);
                tokio::time::sleep(delay).await;
                inner = fresh;
                std::future::poll_fn(|cx| inner.poll_ready(cx)).await?;
            }
            let mut response = inner.call(req).await?;
            if config.headers {
                write_headers(response.headers_mut(), &rules, &verdict);
            }
            Ok(response)
        })
    }
}

/// Decides the shadow rules of an admitted request; counts and logs a request they would have
/// denied. Never fails: a store error is only logged.
async fn shadow_check(config: &Config, shadow: &[(&RateLimitRule, String)]) {
    if shadow.is_empty() {
        return;
    }
    let checks: Vec<LimitCheck<'_>> = shadow
        .iter()
        .map(|(rule, key)| LimitCheck::new(key, &rule.policy, rule.cost))
        .collect();
    match config.limiter.check_all(&checks).await {
        Ok(verdict) => {
            for ((rule, _), decision) in shadow.iter().zip(&verdict.decisions) {
                rule.counters.count(!decision.allowed, decision.degraded);
                if !decision.allowed {
                    tracing::info!(
                        rule = %rule.name,
                        "statehouse: a shadow rate-limit rule would have denied this request"
                    );
                }
            }
        }
        Err(err) => {
            tracing::debug!(error = %err, "statehouse: a shadow rate-limit check failed");
        }
    }
}

/// Whole seconds, rounded up.
fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// `RateLimit-Policy` and `RateLimit` for the rules of a request and their decisions, added as
/// field lines of their own: the lists of nested layers (or of the application) are kept, and
/// a client reads the lines of a field as one comma-separated list.
pub(crate) fn write_headers(headers: &mut HeaderMap, rules: &[&RateLimitRule], verdict: &Verdict) {
    let mut policy = String::new();
    let mut state = String::new();
    let denied = !verdict.allowed();
    for (rule, decision) in rules.iter().zip(&verdict.decisions) {
        if !policy.is_empty() {
            policy.push_str(", ");
        }
        let window = ceil_secs(rule.policy.period()).max(1);
        let _ = write!(
            policy,
            "\"{}\";q={};w={}",
            rule.name,
            rule.policy.limit(),
            window
        );
        if decision.degraded {
            // Not the store's figures: nothing to report.
            continue;
        }
        if !state.is_empty() {
            state.push_str(", ");
        }
        // A rule that admitted a request another rule denied reports what it would have left
        // had the request gone on; nothing was consumed, so what it has is that plus the cost.
        // (Its `t` stays the one of the request going on: an upper bound.)
        let remaining = if denied && decision.allowed {
            decision.remaining.saturating_add(rule.cost)
        } else {
            decision.remaining
        };
        let _ = write!(
            state,
            "\"{}\";r={};t={}",
            rule.name,
            remaining,
            ceil_secs(decision.reset_after)
        );
    }
    // Rule names are checked tokens and the rest are digits: always a valid header value.
    if let Ok(value) = HeaderValue::from_str(&policy) {
        headers.append(RATELIMIT_POLICY, value);
    }
    if !state.is_empty()
        && let Ok(value) = HeaderValue::from_str(&state)
    {
        headers.append(RATELIMIT, value);
    }
}

/// The `Retry-After` of a denied verdict: the longest wait among the denials, in whole
/// seconds rounded up, at least 1.
fn retry_after(verdict: &Verdict) -> u64 {
    verdict
        .decisions
        .iter()
        .filter(|d| !d.allowed)
        .filter_map(|d: &Decision| d.retry_after)
        .map(ceil_secs)
        .max()
        .unwrap_or(1)
        .max(1)
}

/// The `429` answer: `Retry-After`, the quota headers, and a `quota-exceeded` problem.
fn too_many_requests<B: From<Bytes>>(rules: &[&RateLimitRule], verdict: &Verdict) -> Response<B> {
    let mut violated = String::new();
    for (rule, decision) in rules.iter().zip(&verdict.decisions) {
        if !decision.allowed {
            if !violated.is_empty() {
                violated.push(',');
            }
            let _ = write!(violated, "\"{}\"", rule.name);
        }
    }
    let body = format!(
        "{{\"type\":\"https://iana.org/assignments/http-problem-types#quota-exceeded\",\
         \"title\":\"Too many requests\",\"status\":429,\"violated-policies\":[{violated}]}}"
    );
    let mut response = Response::new(B::from(Bytes::from(body)));
    *response.status_mut() = StatusCode::TOO_MANY_REQUESTS;
    let headers = response.headers_mut();
    headers.insert(RETRY_AFTER, HeaderValue::from(retry_after(verdict)));
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    write_headers(headers, rules, verdict);
    response
}

/// The answer when the limiter returns an error: `503` for an unreachable store (the limiter's
/// policy is `ReturnError`), `500` for anything else. The error is logged, never sent.
fn store_failed<B: From<Bytes>>(err: &statehouse::Error) -> Response<B> {
    let status = if err.is_unavailable() {
        tracing::warn!(error = %err, "statehouse: rate limit store unavailable; answering 503");
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        tracing::error!(error = %err, "statehouse: rate limit check failed; answering 500");
        StatusCode::INTERNAL_SERVER_ERROR
    };
    let mut response = Response::new(B::from(Bytes::from_static(b"")));
    *response.status_mut() = status;
    if status == StatusCode::SERVICE_UNAVAILABLE {
        response
            .headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from_static("1"));
    }
    response
}

#[cfg(test)]
mod tests {
    use statehouse::Policy;

    use super::*;
    use crate::ratelimit::{RateLimitRule, RuleKey};

    fn rule(name: &str, limit: u64, period: Duration) -> RateLimitRule {
        RateLimitRule::new(name, Policy::gcra(limit, period).unwrap(), RuleKey::Global).unwrap()
    }

    #[test]
    fn seconds_round_up() {
        assert_eq!(ceil_secs(Duration::ZERO), 0);
        assert_eq!(ceil_secs(Duration::from_nanos(1)), 1);
        assert_eq!(ceil_secs(Duration::from_secs(2)), 2);
        assert_eq!(ceil_secs(Duration::from_millis(2_001)), 3);
    }

    #[test]
    fn headers_list_every_rule_and_leave_degraded_figures_out() {
        let a = rule("per-ip", 100, Duration::from_secs(60));
        let b = rule("global", 5, Duration::from_millis(500));
        let verdict = Verdict {
            decisions: vec![
                Decision::from_parts(true, 100, 42, 16_200_000, None, 0),
                Decision::from_parts(true, 5, 0, 1, None, 0),
            ],
        };
        let mut headers = HeaderMap::new();
        write_headers(&mut headers, &[&a, &b], &verdict);
        assert_eq!(
            headers[RATELIMIT_POLICY],
            "\"per-ip\";q=100;w=60, \"global\";q=5;w=1"
        );
        assert_eq!(
            headers[RATELIMIT],
            "\"per-ip\";r=42;t=17, \"global\";r=0;t=1"
        );

        let degraded = Verdict {
            decisions: vec![
                Decision::degraded(true, 100, None),
                Decision::from_parts(true, 5, 3, 400_000, None, 0),
            ],
        };
        let mut headers = HeaderMap::new();
        write_headers(&mut headers, &[&a, &b], &degraded);
        assert_eq!(headers[RATELIMIT], "\"global\";r=3;t=1");
        let all_degraded = Verdict {
            decisions: vec![Decision::degraded(true, 100, None)],
        };
        let mut headers = HeaderMap::new();
        write_headers(&mut headers, &[&a], &all_degraded);
        assert!(headers.contains_key(RATELIMIT_POLICY));
        assert!(!headers.contains_key(RATELIMIT));
    }

    #[test]
    fn a_denial_says_when_to_retry_and_which_rules_denied() {
        let a = rule("a", 10, Duration::from_secs(10));
        let b = rule("b", 1, Duration::from_secs(60));
        let verdict = Verdict {
            decisions: vec![
                Decision::from_parts(true, 10, 9, 1_000_000, None, 0),
                Decision::from_parts(false, 1, 0, 59_000_000, Some(58_200_000), 0),
            ],
        };
        let response: Response<String> = too_many_requests_string(&[&a, &b], &verdict);
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()[RETRY_AFTER], "59");
        assert_eq!(response.headers()[CONTENT_TYPE], "application/problem+json");
        assert!(
            response.body().contains("\"violated-policies\":[\"b\"]"),
            "{}",
            response.body()
        );
        // A denial without a retry time (fail closed) still says 1 s, never 0.
        let closed = Verdict {
            decisions: vec![Decision::degraded(false, 10, None)],
        };
        assert_eq!(retry_after(&closed), 1);
        let soon = Verdict {
            decisions: vec![Decision::from_parts(false, 10, 0, 1, Some(1), 0)],
        };
        assert_eq!(retry_after(&soon), 1);
    }

    fn too_many_requests_string(rules: &[&RateLimitRule], verdict: &Verdict) -> Response<String> {
        too_many_requests::<Bytes>(rules, verdict)
            .map(|body| String::from_utf8(body.to_vec()).unwrap())
    }
}
