// Insert a canned reply at the cursor without reloading the page (the form works without JS).
document.addEventListener("submit", function (event) {
  var form = event.target;
  if (!form.hasAttribute || !form.hasAttribute("data-canned")) return;
  var select = form.querySelector("select");
  var box = document.getElementById("reply-body");
  var option = select && select.options[select.selectedIndex];
  if (!box || !option) return;
  event.preventDefault();
  var text = option.getAttribute("data-body") || "";
  var start = box.selectionStart || 0, end = box.selectionEnd || 0;
  box.value = box.value.slice(0, start) + text + box.value.slice(end);
  box.focus();
  box.selectionStart = box.selectionEnd = start + text.length;
});
