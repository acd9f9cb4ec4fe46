(function () {
  if (window.__chatbotWidget) return;
  window.__chatbotWidget = true;
  var me = document.currentScript;
  var origin = new URL(me.src).origin;
  var title = me.getAttribute("data-title") || "Chat with us";
  var src = origin + "/";
  var btn = document.createElement("button");
  btn.id = "chatbot-launcher";
  btn.type = "button";
  btn.textContent = title;
  btn.setAttribute("aria-expanded", "false");
  btn.style.cssText = "position:fixed;right:20px;bottom:20px;z-index:2147483646;padding:12px 18px;" +
    "border:0;border-radius:24px;background:#2563eb;color:#fff;font:15px system-ui,sans-serif;cursor:pointer;" +
    "box-shadow:0 4px 14px rgba(0,0,0,.25)";
  var frame = null;
  btn.addEventListener("click", function () {
    if (!frame) {
      frame = document.createElement("iframe");
      frame.id = "chatbot-frame";
      frame.title = title;
      frame.src = src;
      frame.allow = "clipboard-write";
      frame.style.cssText = "position:fixed;right:20px;bottom:76px;z-index:2147483647;width:400px;" +
        "max-width:calc(100vw - 40px);height:620px;max-height:calc(100vh - 100px);border:1px solid #ddd;" +
        "border-radius:12px;background:#fff;box-shadow:0 8px 30px rgba(0,0,0,.25)";
      document.body.appendChild(frame);
    } else {
      frame.style.display = frame.style.display === "none" ? "block" : "none";
    }
    btn.setAttribute("aria-expanded", frame.style.display === "none" ? "false" : "true");
  });
  document.body.appendChild(btn);
})();
