#include "policies/page_meta.h"

namespace headwise {

std::string_view PagePrecisionName(PagePrecision precision) {
  switch (precision) {
    case PagePrecision::kNative:
      return "native";
    case PagePrecision::kInt8:
      return "int8";
    case PagePrecision::kInt4:
      return "int4";
    case PagePrecision::kInt2:
      return "int2";
  }
  return "unknown";
}

}  // namespace headwise
