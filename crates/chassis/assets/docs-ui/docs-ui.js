// Starts Swagger UI on the docs page (chassis::api::docs_ui). A file of its
// own, not an inline script, so that the page's Content-Security-Policy can
// allow scripts from the service only ('self').
(function () {
  "use strict";
  var root = document.getElementById("swagger-ui");
  window.ui = SwaggerUIBundle({
    // Relative to the page, so the page works behind a proxy that mounts
    // the service under another path.
    url: root.getAttribute("data-openapi-url"),
    domNode: root,
    presets: [SwaggerUIBundle.presets.apis],
    layout: "BaseLayout",
    deepLinking: true,
    // The badge would send the document to validator.swagger.io: nothing
    // leaves the service.
    validatorUrl: null,
    // No `?url=` or `?configUrl=`: the page shows this service's document
    // only.
    queryConfigEnabled: false,
    displayRequestDuration: true,
    persistAuthorization: false
  });
})();
