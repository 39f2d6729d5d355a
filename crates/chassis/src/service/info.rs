//! What a service reports at `/info` about its build, and the macro that
//! fills it in from the calling crate.

use serde::Serialize;

/// What a service reports at `/info` about its build.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct BuildInfo {
    /// The package name.
    pub package: &'static str,
    /// The package version.
    pub version: &'static str,
    /// The git commit, when the build set `CHASSIS_BUILD_GIT_SHA`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub git_sha: Option<&'static str>,
    /// When it was built, when the build set `CHASSIS_BUILD_TIME`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub build_time: Option<&'static str>,
}

/// The [`BuildInfo`] of the crate that calls it: its package name and version
/// and, when set at compile time, `CHASSIS_BUILD_GIT_SHA` and
/// `CHASSIS_BUILD_TIME`.
#[macro_export]
macro_rules! build_info {
    () => {
        $crate::service::BuildInfo {
            package: env!("CARGO_PKG_NAME"),
            version: env!("CARGO_PKG_VERSION"),
            git_sha: option_env!("CHASSIS_BUILD_GIT_SHA"),
            build_time: option_env!("CHASSIS_BUILD_TIME"),
        }
    };
}
