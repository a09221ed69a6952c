"""medtl: reproducible transfer learning for medical image classification."""
